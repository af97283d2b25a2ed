"""Bar (issue 2): the daemon's idle RSS <= 60 MB and idle CPU <= 0.5 % of one core over 60 s,
with the default model serving (health probes running), in a booted systemd.

CPU is utime + stime of sparkd's main process from /proc/PID/stat over the window, against
the same figure for systemd-journald (a daemon every machine runs) as the baseline beside it.
"""

from __future__ import annotations

import sys
import time

from container import machine, sparkd_container

WINDOW_S = 60.0
RSS_BAR_MB = 60.0
CPU_BAR_PCT = 0.5


def cpu_ticks(box: object, pid: str) -> int:
    stat = box.exec(["cat", f"/proc/{pid}/stat"]).stdout  # type: ignore[attr-defined]
    fields = stat.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14, 15 of stat)


def rss_mb(box: object, pid: str) -> float:
    status = box.exec(["cat", f"/proc/{pid}/status"]).stdout  # type: ignore[attr-defined]
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def main() -> int:
    with sparkd_container() as box:
        hz = int(box.exec(["getconf", "CLK_TCK"]).stdout)
        pids = {
            unit: box.exec(["systemctl", "show", "-P", "MainPID", unit]).stdout.strip()
            for unit in ("sparkd.service", "systemd-journald.service")
        }
        time.sleep(5)  # let start-up work finish
        start = {u: cpu_ticks(box, p) for u, p in pids.items()}
        t0 = time.monotonic()
        time.sleep(WINDOW_S)
        elapsed = time.monotonic() - t0
        cpu = {u: (cpu_ticks(box, p) - start[u]) / hz / elapsed * 100 for u, p in pids.items()}
        rss = {u: rss_mb(box, p) for u, p in pids.items()}
    print(f"machine: {machine()}; idle window {elapsed:.0f} s, health probes every 5 s")
    for unit in pids:
        print(f"{unit:28} RSS {rss[unit]:6.1f} MB   CPU {cpu[unit]:5.2f} % of one core")
    ok_rss = rss["sparkd.service"] <= RSS_BAR_MB
    ok_cpu = cpu["sparkd.service"] <= CPU_BAR_PCT
    print(f"bar: RSS {rss['sparkd.service']:.1f} MB <= {RSS_BAR_MB:.0f} MB: "
          f"{'MET' if ok_rss else 'NOT MET'}")
    print(f"bar: CPU {cpu['sparkd.service']:.2f} % <= {CPU_BAR_PCT} %: "
          f"{'MET' if ok_cpu else 'NOT MET'}")
    return 0 if ok_rss and ok_cpu else 1


if __name__ == "__main__":
    sys.exit(main())
