"""The timer-lateness probe (docs/watch.md "The desktop ladder"): a small process in user.slice,
beside the desktop's processes, that sleeps `period` again and again and records how late each
wake came. Every `report` seconds it rewrites one small file (write a temporary file, rename
it over: a reader sees the old report or the new one, never half) with the p99 and the worst
lateness over the last `window` seconds:

    {"p99_ms": 1.8, "max_ms": 6.2, "samples": 500, "period_ms": 20, "window_s": 10}

sparkd reads it on its health tick (`read_report`); a report older than
`daemon.desktop_lateness_stale_s` counts as no reading. Standard library only, so the process
stays small: `python3 -I -m sparkd.monitor.lateness` (units/sparkd-lateness.service).
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class Report:
    p99_ms: float
    max_ms: float
    samples: int
    period_ms: float
    window_s: float
    age_s: float  # how long ago the probe wrote it


def p99(samples: collections.deque[float] | list[float]) -> float:
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    return ordered[max(math.ceil(0.99 * len(ordered)), 1) - 1]


def render(late_s: collections.deque[float] | list[float], period_s: float,
           window_s: float) -> bytes:
    return (json.dumps({
        "p99_ms": round(p99(late_s) * 1000, 3),
        "max_ms": round(max(late_s) * 1000, 3),
        "samples": len(late_s),
        "period_ms": round(period_s * 1000, 3),
        "window_s": window_s,
    }) + "\n").encode()


def write_report(path: Path, data: bytes) -> None:
    """Replace `path` atomically (tmpfs under /run: no fsync needed, nothing survives a boot)."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def parse_report(text: str, age_s: float) -> Report:
    """Raises ValueError on anything but the probe's report."""
    raw = json.loads(text)
    if not isinstance(raw, dict):
        raise ValueError("not a JSON object")
    try:
        return Report(float(raw["p99_ms"]), float(raw["max_ms"]), int(raw["samples"]),
                      float(raw["period_ms"]), float(raw["window_s"]), age_s)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"missing or wrong field: {exc}") from None


def read_report(path: Path, now_wall: float | None = None) -> Report | None:
    """The probe's last report; None when there is none (not started, not yet written).
    Raises ValueError when the file holds something else."""
    try:
        with open(path, "rb") as f:
            mtime = os.fstat(f.fileno()).st_mtime
            text = f.read(4096).decode()
    except FileNotFoundError:
        return None
    now = time.time() if now_wall is None else now_wall
    return parse_report(text, max(0.0, now - mtime))


def run(out: Path, *, period_s: float, window_s: float, report_s: float,
        iterations: int | None = None) -> None:
    late: collections.deque[float] = collections.deque(
        maxlen=max(1, int(window_s / period_s)))
    next_report = time.monotonic() + report_s
    n = 0
    while iterations is None or n < iterations:
        before = time.monotonic()
        time.sleep(period_s)
        now = time.monotonic()
        late.append(max(0.0, now - before - period_s))
        n += 1
        if now >= next_report:
            write_report(out, render(late, period_s, window_s))
            next_report = now + report_s
    if late:
        write_report(out, render(late, period_s, window_s))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python3 -m sparkd.monitor.lateness",
                                     description="sparkd's timer-lateness probe")
    parser.add_argument("--out", type=Path, default=Path("/run/sparkd-lateness/lateness"))
    parser.add_argument("--period-ms", type=float, default=20.0)
    parser.add_argument("--window-s", type=float, default=10.0)
    parser.add_argument("--report-s", type=float, default=1.0)
    parser.add_argument("--iterations", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not (1 <= args.period_ms <= 1000 and args.window_s >= args.period_ms / 1000
            and args.report_s > 0):
        parser.error("--period-ms from 1 to 1000, --window-s at least one period, "
                     "--report-s over 0")
    run(args.out, period_s=args.period_ms / 1000, window_s=args.window_s,
        report_s=args.report_s, iterations=args.iterations)


if __name__ == "__main__":
    main()
