"""PURE: what to hash, what to fetch, when to try again, and how far along the work is.

Nothing here touches the file system or the network: the model directory comes in as a
`LocalView` (what a stat of each file found), the manifest as a value, and time as numbers.

    plan_verify(manifest, local, full=...)  -> VerifyPlan   which files to hash, which are
                                                            settled by their stamp or size
    judge(entry, digest)                    -> Status       OK or BAD
    plan_fetch(manifest, statuses, local)   -> tuple[FetchJob, ...]   what to (re)download,
                                                            resuming from the partial file
    RetryPolicy.delay(attempt)              -> seconds      capped exponential backoff
    ProgressBook                                            bytes done, speed, ETA
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from sparkd.store.manifest import FileEntry, Manifest, Stamp


class Status(enum.StrEnum):
    OK = "OK"  # the digest matches (now, or at an unchanged stamp)
    BAD = "BAD"  # the wrong size or the wrong digest
    MISSING = "MISSING"  # in the manifest, not on disk
    EXTRA = "EXTRA"  # on disk, not in the manifest


@dataclass(frozen=True, slots=True)
class LocalView:
    """What the model directory holds: a stamp per regular file (by relative path), the
    sizes of sparkd's partial downloads, and files that are in no manifest."""

    stamps: Mapping[str, Stamp]
    partials: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class FileVerdict:
    path: str
    status: Status
    reason: str = ""
    hashed: bool = False  # read and hashed in this run (not settled by its stamp)


@dataclass(frozen=True, slots=True)
class VerifyPlan:
    to_hash: tuple[FileEntry, ...]  # biggest first, so parallel workers finish together
    settled: tuple[FileVerdict, ...]  # decided without reading: stamp unchanged, missing, size
    extra: tuple[str, ...]

    @property
    def hash_bytes(self) -> int:
        return sum(e.size for e in self.to_hash)


def plan_verify(
    manifest: Manifest, local: LocalView, *, full: bool, extra: Iterable[str] = ()
) -> VerifyPlan:
    """Incremental: a file whose stamp equals the one it verified at is OK without reading it;
    `full` hashes every file that is there. A wrong size is BAD without reading."""
    to_hash: list[FileEntry] = []
    settled: list[FileVerdict] = []
    for entry in manifest.files:
        stamp = local.stamps.get(entry.path)
        if stamp is None:
            settled.append(FileVerdict(entry.path, Status.MISSING, "not on disk"))
        elif stamp.size != entry.size:
            settled.append(
                FileVerdict(
                    entry.path, Status.BAD, f"size {stamp.size} bytes, expected {entry.size}"
                )
            )
        elif not full and entry.verified == stamp:
            settled.append(FileVerdict(entry.path, Status.OK, "unchanged since verified"))
        else:
            to_hash.append(entry)
    to_hash.sort(key=lambda e: (-e.size, e.path))
    known = {e.path for e in manifest.files}
    extras = tuple(sorted(p for p in extra if p not in known))
    return VerifyPlan(to_hash=tuple(to_hash), settled=tuple(settled), extra=extras)


def judge(entry: FileEntry, digest: str, *, size: int) -> FileVerdict:
    if size != entry.size:
        return FileVerdict(
            entry.path, Status.BAD, f"size {size} bytes, expected {entry.size}", hashed=True
        )
    if digest != entry.digest:
        return FileVerdict(
            entry.path,
            Status.BAD,
            f"{entry.algorithm} {digest[:12]}..., expected {entry.digest[:12]}...",
            hashed=True,
        )
    return FileVerdict(entry.path, Status.OK, f"{entry.algorithm} matches", hashed=True)


@dataclass(frozen=True, slots=True)
class VerifyReport:
    """The outcome of a verification (or of a pull, which ends with one)."""

    model: str
    verdicts: tuple[FileVerdict, ...]  # sorted by path, EXTRA files included
    manifest: Manifest | None  # with the stamps of what verified; None: nothing to verify
    hashed_bytes: int = 0  # read from disk and hashed by the verification
    fetched_bytes: int = 0  # received over the network by a pull or repair
    note: str = ""  # e.g. why there was nothing to verify

    @property
    def ok(self) -> bool:
        """Every file is OK (an EXTRA file is not: an engine may load a stray shard)."""
        return all(v.status is Status.OK for v in self.verdicts)

    @property
    def failures(self) -> tuple[FileVerdict, ...]:
        return tuple(v for v in self.verdicts if v.status is not Status.OK)

    @property
    def blocking(self) -> tuple[FileVerdict, ...]:
        """BAD and MISSING files: an engine must not start on them."""
        return tuple(v for v in self.verdicts if v.status in (Status.BAD, Status.MISSING))

    def count(self, status: Status) -> int:
        return sum(1 for v in self.verdicts if v.status is status)


def merge_verdicts(
    *groups: Iterable[FileVerdict],
) -> tuple[FileVerdict, ...]:
    """Later groups win for the same path (a fetch's verdict replaces the verification's)."""
    merged: dict[str, FileVerdict] = {}
    for group in groups:
        for verdict in group:
            merged[verdict.path] = verdict
    return tuple(merged[p] for p in sorted(merged))


@dataclass(frozen=True, slots=True)
class FetchJob:
    entry: FileEntry
    resume_from: int  # bytes of the partial file to keep (0: start over)

    @property
    def path(self) -> str:
        return self.entry.path

    @property
    def to_transfer(self) -> int:
        return self.entry.size - self.resume_from


def plan_fetch(
    manifest: Manifest, verdicts: Iterable[FileVerdict], local: LocalView
) -> tuple[FetchJob, ...]:
    """Every file that is BAD or MISSING is fetched, and only those. A partial download no
    longer than the file is resumed (its bytes are hashed again before they count); a longer
    one cannot be a prefix and starts over."""
    wanted = {v.path for v in verdicts if v.status in (Status.BAD, Status.MISSING)}
    jobs = []
    for entry in manifest.files:
        if entry.path not in wanted:
            continue
        partial = local.partials.get(entry.path, 0)
        jobs.append(FetchJob(entry, partial if 0 < partial <= entry.size else 0))
    return tuple(jobs)


def bytes_to_fetch(jobs: Iterable[FetchJob]) -> int:
    """The bytes a fetch of these jobs adds to the disk at most: each file's bytes after its
    partial (the old file, when one is replaced, stays until the new one is renamed over it)."""
    return sum(max(0, job.to_transfer) for job in jobs)


@dataclass(slots=True)
class RateFloor:
    """A minimum transfer rate over tumbling windows of `window_s`: a server that trickles a
    byte every 1.5 s never trips a read timeout, but it trips this.

    `check(now, received)` is called as bytes arrive; it returns "" while the rate holds and the
    reason once a whole window passed with fewer than `min_bytes_per_s * window_s` bytes."""

    min_bytes_per_s: int
    window_s: float
    start: float
    received: int

    def check(self, now: float, received: int) -> str:
        if self.min_bytes_per_s <= 0:
            return ""
        elapsed = now - self.start
        if elapsed < self.window_s:
            return ""
        moved = received - self.received
        if moved < self.min_bytes_per_s * elapsed:
            return (f"too slow: {moved} bytes in {elapsed:.1f} s, below the minimum of "
                    f"{self.min_bytes_per_s} bytes/s")
        self.start, self.received = now, received
        return ""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Capped exponential backoff: base, base*factor, ... up to cap; `attempts` tries in all.
    A try that made progress (bytes arrived) resets the backoff but still counts, so a server
    that drops every connection after a few bytes cannot keep a pull going forever."""

    attempts: int = 8
    base_s: float = 0.5
    factor: float = 2.0
    cap_s: float = 30.0
    hash_attempts: int = 3  # whole-file fetches that may fail their hash before giving up

    def delay(self, failures_in_a_row: int) -> float:
        """Seconds to wait after the n-th consecutive failure (n >= 1)."""
        if failures_in_a_row < 1:
            return 0.0
        return float(min(self.cap_s, self.base_s * self.factor ** (failures_in_a_row - 1)))

    def may_retry(self, tries: int) -> bool:
        return tries < self.attempts


@dataclass(frozen=True, slots=True)
class FetchSettings:
    """Knobs of a transfer (from [daemon]; tests pass a short backoff)."""

    concurrency: int = 4
    stall_timeout_s: float = 30.0
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    # Below this over a window of stall_timeout_s, a transfer is dropped and tried again
    # (0: no floor).
    min_rate_bytes_per_s: int = 16384
    # Refuse up front when the bytes to fetch (plus FREE_SPACE_MARGIN) do not fit.
    check_free_space: bool = True


@dataclass(slots=True)
class ProgressBook:
    """Bytes done per file and in total; speed over a sliding window; ETA.

    Resumed bytes count as done from the start but not toward the speed (they were not
    transferred in this run)."""

    window_s: float = 5.0
    totals: dict[str, int] = field(default_factory=dict)
    done: dict[str, int] = field(default_factory=dict)
    _samples: deque[tuple[float, int]] = field(default_factory=deque)
    _moved: int = 0  # bytes transferred in this run

    def add_file(self, path: str, total: int, *, already: int = 0) -> None:
        self.totals[path] = total
        self.done[path] = already

    def advance(self, path: str, nbytes: int, now: float) -> None:
        self.done[path] = self.done.get(path, 0) + nbytes
        self._moved += nbytes
        self._samples.append((now, self._moved))
        while len(self._samples) > 2 and self._samples[0][0] < now - self.window_s:
            self._samples.popleft()

    def restart_file(self, path: str, already: int) -> None:
        """The file's bytes were thrown away (failed hash) or cut back to what is on disk."""
        self.done[path] = already

    @property
    def total(self) -> int:
        return sum(self.totals.values())

    @property
    def completed(self) -> int:
        return sum(self.done.values())

    def speed(self) -> float:
        """Bytes per second over the window (0 before two samples)."""
        if len(self._samples) < 2:
            return 0.0
        (t0, b0), (t1, b1) = self._samples[0], self._samples[-1]
        return (b1 - b0) / (t1 - t0) if t1 > t0 else 0.0

    def eta_s(self) -> float | None:
        speed = self.speed()
        if speed <= 0:
            return None
        return max(0, self.total - self.completed) / speed
