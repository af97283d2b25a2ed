"""Progress of a verification or a pull, told to a `Reporter`.

The store calls a reporter from the event loop and from hashing threads, so every
implementation is thread-safe. `NullReporter` ignores everything (the swap preflight),
`JsonLinesReporter` writes one JSON object a line for scripts (`--json`), and `RichReporter`
(in sparkd.store.commands' terminal output) draws rich progress bars.

JSON lines (`"event"` is the kind; sizes in bytes, times in seconds):

    {"event": "phase", "phase": "verify"|"fetch", "files": N, "bytes": B}
    {"event": "progress", "phase": ..., "path": P, "done": D, "total": T,
     "total_done": TD, "total_bytes": TB, "speed": BPS, "eta_s": S|null}
    {"event": "retry", "path": P, "attempt": K, "reason": R, "delay_s": S}
    {"event": "file", "path": P, "status": "OK"|"BAD"|"MISSING"|"EXTRA", "reason": R,
     "hashed": bool}
    {"event": "result", "model": M, "ok": bool, "files": {...counts...},
     "failures": [{"path": P, "status": S, "reason": R}], "revision": C|null}
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, Literal, Protocol

from sparkd.store.plan import FileVerdict, ProgressBook, Status, VerifyReport

Phase = Literal["verify", "fetch"]


class Reporter(Protocol):
    def phase(self, phase: Phase, files: Sequence[tuple[str, int, int]]) -> None:
        """Work begins on these (path, total bytes, bytes already there) files."""
        ...

    def advance(self, path: str, nbytes: int) -> None: ...

    def restart(self, path: str, already: int) -> None:
        """The file's progress went back to `already` bytes (a retry from what is on disk)."""
        ...

    def retry(self, path: str, attempt: int, reason: str, delay_s: float) -> None: ...

    def file_done(self, verdict: FileVerdict) -> None: ...

    def result(self, report: VerifyReport) -> None: ...


class NullReporter:
    def phase(self, phase: Phase, files: Sequence[tuple[str, int, int]]) -> None:
        pass

    def advance(self, path: str, nbytes: int) -> None:
        pass

    def restart(self, path: str, already: int) -> None:
        pass

    def retry(self, path: str, attempt: int, reason: str, delay_s: float) -> None:
        pass

    def file_done(self, verdict: FileVerdict) -> None:
        pass

    def result(self, report: VerifyReport) -> None:
        pass


def report_json(report: VerifyReport) -> dict[str, Any]:
    return {
        "event": "result",
        "model": report.model,
        "ok": report.ok,
        "revision": report.manifest.revision if report.manifest else None,
        "files": {s.value: report.count(s) for s in Status},
        "hashed_bytes": report.hashed_bytes,
        "fetched_bytes": report.fetched_bytes,
        "failures": [
            {"path": v.path, "status": v.status.value, "reason": v.reason}
            for v in report.failures
        ],
        "note": report.note,
    }


class JsonLinesReporter:
    """One JSON object a line; progress lines at most every `interval_s` per file (and the
    last one of each file always)."""

    def __init__(
        self,
        out: IO[str],
        *,
        interval_s: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._out = out
        self._interval = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._book = ProgressBook()
        self._phase: Phase = "verify"
        self._last: dict[str, float] = {}

    def _emit(self, obj: dict[str, Any]) -> None:
        self._out.write(json.dumps(obj, sort_keys=True) + "\n")
        self._out.flush()

    def phase(self, phase: Phase, files: Sequence[tuple[str, int, int]]) -> None:
        with self._lock:
            self._phase = phase
            self._book = ProgressBook()
            self._last = {}
            for path, total, already in files:
                self._book.add_file(path, total, already=already)
            self._emit(
                {"event": "phase", "phase": phase, "files": len(files), "bytes": self._book.total}
            )

    def advance(self, path: str, nbytes: int) -> None:
        with self._lock:
            now = self._clock()
            self._book.advance(path, nbytes, now)
            finished = self._book.done[path] >= self._book.totals.get(path, 0)
            if finished or now - self._last.get(path, -1e9) >= self._interval:
                self._last[path] = now
                self._progress_line(path)

    def _progress_line(self, path: str) -> None:
        eta = self._book.eta_s()
        self._emit(
            {
                "event": "progress",
                "phase": self._phase,
                "path": path,
                "done": self._book.done[path],
                "total": self._book.totals.get(path, 0),
                "total_done": self._book.completed,
                "total_bytes": self._book.total,
                "speed": round(self._book.speed()),
                "eta_s": None if eta is None else round(eta, 1),
            }
        )

    def restart(self, path: str, already: int) -> None:
        with self._lock:
            self._book.restart_file(path, already)

    def retry(self, path: str, attempt: int, reason: str, delay_s: float) -> None:
        with self._lock:
            self._emit(
                {
                    "event": "retry",
                    "path": path,
                    "attempt": attempt,
                    "reason": reason,
                    "delay_s": round(delay_s, 3),
                }
            )

    def file_done(self, verdict: FileVerdict) -> None:
        with self._lock:
            self._emit(
                {
                    "event": "file",
                    "phase": self._phase,
                    "path": verdict.path,
                    "status": verdict.status.value,
                    "reason": verdict.reason,
                    "hashed": verdict.hashed,
                }
            )

    def result(self, report: VerifyReport) -> None:
        with self._lock:
            self._emit(report_json(report))
