"""Bar (issue 13): the watch costs <= 0.5 % of one core and <= 10 MB over the idle daemon.
The desktop ladder adds a process (the timer-lateness probe, sparkd-lateness.service) and, in
sparkd, one small file read per health tick. This measures both, side by side with the
baseline each is compared to:

1. the probe (`python3 -I -S`, its shipped settings: sparkd.monitor.lateness's defaults)
   against a bare `python3 -I -S` process that sleeps the same period
   (the interpreter's own floor) and against nothing: CPU % of one core over SECONDS, and
   its resident memory (VmRSS, VmHWM; PSS where smaps_rollup is readable) - all of it counts
   as "over the idle daemon", since the probe is a process of its own;
2. sparkd's read of the probe's report (`read_report`), CPU time per call, and what it comes
   to at one read per health tick (5 s) and, pessimistically, one per second.

Run: .venv/bin/python bench/desktop_probe.py [SECONDS]
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sparkd.monitor.lateness import PERIOD_MS, REPORT_S, read_report

REPO = Path(__file__).resolve().parents[1]
CPU_BAR_PCT = 0.5
RSS_BAR_MB = 10.0
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime, stime


def memory_kb(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                out["Pss"] = int(line.split()[1])
    except OSError:
        pass
    return out


def measure(argv: list[str], seconds: float) -> tuple[float, dict[str, int]]:
    proc = subprocess.Popen(argv, cwd=REPO)
    try:
        time.sleep(1.0)  # past the start-up (imports), which is not the steady cost
        c0, t0 = cpu_s(proc.pid), time.monotonic()
        time.sleep(seconds)
        c1, t1 = cpu_s(proc.pid), time.monotonic()
        mem = memory_kb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(10)
    return 100 * (c1 - c0) / (t1 - t0), mem


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 30.0
    print(f"load average before: {os.getloadavg()}")
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "lateness"
        probe = [sys.executable, "-I", "-S", "-c",
                 f"import sys; sys.path.insert(0, {str(REPO)!r}); "
                 "from sparkd.monitor.lateness import main; main()", "--out", str(out)]
        bare = [sys.executable, "-I", "-S", "-c",
                f"import time\nwhile True: time.sleep({PERIOD_MS / 1000})"]
        probe_pct, probe_mem = measure(probe, seconds)
        bare_pct, bare_mem = measure(bare, seconds)
        report = read_report(out)
        assert report is not None and report.samples > 0
        n = 20000
        t0 = time.process_time()
        for _ in range(n):
            read_report(out)
        per_read_us = (time.process_time() - t0) / n * 1e6
    rss_mb = probe_mem["VmRSS"] / 1024
    print("| what | CPU % of one core | VmRSS MB | VmHWM MB | PSS MB |")
    print("| --- | --- | --- | --- | --- |")
    probe_name = f"lateness probe ({PERIOD_MS:g} ms, report {REPORT_S:g} s)"
    for name, pct, mem in ((probe_name, probe_pct, probe_mem),
                           (f"bare python3 -S sleeping {PERIOD_MS:g} ms (baseline)", bare_pct,
                            bare_mem)):
        pss = f"{mem['Pss'] / 1024:.1f}" if "Pss" in mem else "-"
        print(f"| {name} | {pct:.3f} | {mem['VmRSS'] / 1024:.1f} | {mem['VmHWM'] / 1024:.1f} "
              f"| {pss} |")
    print(f"| sparkd reading the report | {per_read_us:.1f} us a read: "
          f"{per_read_us / 5 / 1e4:.5f} % at one per 5 s tick, {per_read_us / 1e4:.4f} % at "
          "one a second | - | - | - |")
    print(f"probe's last report: p99 {report.p99_ms} ms, max {report.max_ms} ms over "
          f"{report.samples} wakes")
    print(f"ratio probe/bare CPU: {probe_pct / bare_pct if bare_pct else float('inf'):.2f}")
    ok_cpu = probe_pct + per_read_us / 1e4 <= CPU_BAR_PCT
    ok_rss = rss_mb <= RSS_BAR_MB
    print(f"bar: CPU {probe_pct:.3f} % <= {CPU_BAR_PCT} %: {'met' if ok_cpu else 'MISSED'}; "
          f"RSS {rss_mb:.1f} MB <= {RSS_BAR_MB} MB: {'met' if ok_rss else 'MISSED'}")
    print(f"load average after: {os.getloadavg()}")


if __name__ == "__main__":
    main()
