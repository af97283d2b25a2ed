"""The timer-lateness probe (docs/watch.md "The desktop ladder"): a small process in user.slice,
beside the desktop's processes, that sleeps `period` again and again and records how late each
wake came. Every `report` seconds it rewrites one small file (write a temporary file, rename
it over: a reader sees the old report or the new one, never half) with the p99 and the worst
lateness over the last `window` seconds:

    {"p99_ms": 1.8, "max_ms": 6.2, "samples": 200, "period_ms": 50, "window_s": 10}

sparkd reads it on its health tick (`read_report`); a report older than
`daemon.desktop_lateness_stale_s` counts as no reading. Standard library only, so the process
stays small: `python3 -I -S` importing it (units/sparkd-lateness.service).
"""

from __future__ import annotations

import math
import os
import sys
import time

#: The shipped settings (units/sparkd-lateness.service passes none): a wake every 50 ms (20 a
#: second; how late a wake comes does not depend on how long the sleep was), the p99 over
#: 10 s (200 wakes: the 2nd latest), a report every 2 s (sparkd's health tick is 5 s; a
#: report is stale after 5 s). Chosen for the cost bar (bench/desktop_probe.py): at 40 wakes a
#: second the Python interpreter's wake-ups alone cost 0.5 % of a core on the loaded 2-core
#: development VM. The module imports
#: nothing but math, os, sys and time at the top, so the probe's process stays small (json
#: only when sparkd reads a report).
PERIOD_MS = 50.0
WINDOW_S = 10.0
REPORT_S = 2.0
OUT = "/run/sparkd-lateness/lateness"
USAGE = ("usage: python3 -I -S -m sparkd.monitor.lateness [--out PATH] [--period-ms 1-1000] "
         "[--window-s S] [--report-s S]")


class Report:
    __slots__ = ("age_s", "max_ms", "p99_ms", "period_ms", "samples", "window_s")

    def __init__(self, p99_ms: float, max_ms: float, samples: int, period_ms: float,
                 window_s: float, age_s: float) -> None:
        self.p99_ms, self.max_ms, self.samples = p99_ms, max_ms, samples
        self.period_ms, self.window_s, self.age_s = period_ms, window_s, age_s


def p99(samples: list[float]) -> float:
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    return ordered[max(math.ceil(0.99 * len(ordered)), 1) - 1]


def render(late_s: list[float], period_s: float, window_s: float) -> bytes:
    """The report as JSON, written by hand (no json import in the probe's process)."""
    return (f'{{"p99_ms": {p99(late_s) * 1000:.3f}, "max_ms": {max(late_s) * 1000:.3f}, '
            f'"samples": {len(late_s)}, "period_ms": {period_s * 1000:g}, '
            f'"window_s": {window_s:g}}}\n').encode()


def write_report(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace `path` atomically (tmpfs under /run: no fsync needed, nothing survives a boot)."""
    path = os.fspath(path)
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def parse_report(text: str, age_s: float) -> Report:
    """Raises ValueError on anything but the probe's report."""
    import json

    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    try:
        report = Report(float(raw["p99_ms"]), float(raw["max_ms"]), int(raw["samples"]),
                        float(raw["period_ms"]), float(raw["window_s"]), age_s)
    except (KeyError, TypeError, ValueError, OverflowError) as exc:
        # the exception's text is not echoed: it could quote the file's content
        raise ValueError(f"missing or wrong field ({type(exc).__name__})") from None
    for name in ("p99_ms", "max_ms", "period_ms", "window_s"):
        # json takes NaN and Infinity: a NaN p99 compares under every threshold (a false calm)
        if not math.isfinite(getattr(report, name)) or getattr(report, name) < 0:
            raise ValueError(f"{name} is not a finite number >= 0")
    if report.samples < 0:
        raise ValueError("samples is negative")
    return report


def read_report(path: str | os.PathLike[str], now_wall: float | None = None) -> Report | None:
    """The probe's last report; None when there is none (not started, not yet written).
    Raises ValueError when the file holds something else. Never blocks (sparkd calls it on its
    event loop, as root, and `daemon.desktop_lateness_file` may name a path others can write):
    a FIFO, a device or a symlink in its place is refused, not opened or followed."""
    import errno
    import stat

    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_NOCTTY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise ValueError("it is a symlink (the probe writes a regular file)") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise ValueError("not a regular file (the probe writes one)")
        text = os.read(fd, 4096).decode()
    finally:
        os.close(fd)
    mtime = st.st_mtime
    now = time.time() if now_wall is None else now_wall
    return parse_report(text, max(0.0, now - mtime))


def run(out: str, *, period_s: float, window_s: float, report_s: float,
        iterations: int | None = None) -> None:
    size = max(1, int(window_s / period_s))
    late: list[float] = []  # a ring of the last `size` lateness readings
    at = 0
    monotonic, sleep = time.monotonic, time.sleep
    next_report = monotonic() + report_s
    n = 0
    while iterations is None or n < iterations:
        before = monotonic()
        sleep(period_s)
        now = monotonic()
        value = now - before - period_s
        value = value if value > 0 else 0.0
        if len(late) < size:
            late.append(value)
        else:
            late[at] = value
            at = (at + 1) % size
        n += 1
        if now >= next_report:
            write_report(out, render(late, period_s, window_s))
            next_report = now + report_s
    if late:
        write_report(out, render(late, period_s, window_s))


def _args(argv: list[str]) -> dict[str, str]:
    known = {"--out", "--period-ms", "--window-s", "--report-s", "--iterations"}
    if len(argv) % 2 or any(k not in known for k in argv[::2]):
        raise SystemExit(USAGE)
    return dict(zip(argv[::2], argv[1::2], strict=True))


def main(argv: list[str] | None = None) -> None:
    args = _args(sys.argv[1:] if argv is None else argv)
    try:
        period_ms = float(args.get("--period-ms", PERIOD_MS))
        window_s = float(args.get("--window-s", WINDOW_S))
        report_s = float(args.get("--report-s", REPORT_S))
        iterations = int(args["--iterations"]) if "--iterations" in args else None
    except ValueError as exc:
        raise SystemExit(f"{USAGE}\n{exc}") from None
    if not (1 <= period_ms <= 1000 and period_ms / 1000 <= window_s <= 3600
            and 0 < report_s <= 3600):  # NaN fails every comparison
        raise SystemExit(f"{USAGE}\n--period-ms from 1 to 1000, --window-s at least one "
                         "period and at most 3600, --report-s over 0 and at most 3600")
    run(args.get("--out", OUT), period_s=period_ms / 1000, window_s=window_s,
        report_s=report_s, iterations=iterations)


if __name__ == "__main__":
    main()
