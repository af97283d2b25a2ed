"""Bar (issue 13): the watch sampling everything costs <= 0.5 % of one core and <= 10 MB over
the idle daemon.

"Everything" is the whole watch as shipped, all on at once, in a booted systemd with the .deb
(run as root after `make deb`): the memory floor (read every 0.1 s near the floor, up to 1 s
apart far above it), liveness (the engine's /metrics read every health tick), PSI and NVML
(where present) every health tick, the udev monitor, the desktop ladder with a desktop present
(forced: a container has no logind session) reading the lateness probe's report, the probe
itself (`sparkd-lateness.service`, its own process in user.slice, waking every 50 ms), and the
Prometheus endpoint (`daemon.metrics_listen`) scraped once a second. Against: the same daemon
with all of it off (`memory_floor_gib = 0`, `liveness_strikes = 0`, `desktop_ladder = []`,
no metrics endpoint, the probe stopped). Both serve the default model, idle, for IDLE_S.

CPU: sparkd's and the probe's utime + stime from /proc/PID/stat. Memory: sparkd's VmRSS, and
the probe's PSS (its private pages plus its share of the pages it shares, such as the Python
interpreter's text, which sparkd maps too: its RSS would count those twice); the probe's RSS
is printed beside it.

    sudo .venv/bin/python bench/watch_cost.py
"""

from __future__ import annotations

import sys
import threading
import time

from container import machine, sparkd_container, wait_serving
from harness import Container

CPU_BAR_PCT = 0.5
MEM_BAR_MB = 10.0
IDLE_S = 60.0
METRICS = "127.0.0.1:9471"
ON = (f'metrics_listen = "{METRICS}"\\ndesktop_presence = "present"')
OFF = ("memory_floor_gib = 0\\nmemory_floor_interval_s = 10\\nliveness_strikes = 0\\n"
       "desktop_ladder = []")
PROBE = "sparkd-lateness.service"


def ticks(box: Container, pid: str) -> int:
    fields = box.exec(["cat", f"/proc/{pid}/stat"]).stdout.rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])


def kib(box: Container, pid: str, path: str, key: str) -> float:
    text = box.exec(["cat", f"/proc/{pid}/{path}"]).stdout
    return next(int(line.split()[1]) for line in text.splitlines() if line.startswith(key))


def scrape_every_second(box: Container, stop: threading.Event) -> None:
    while not stop.wait(1.0):
        box.exec(["python3", "-c", "import urllib.request; urllib.request.urlopen("
                  f"'http://{METRICS}/metrics', timeout=2).read()"], check=False)


def idle(box: Container, settings: str, *, probe: bool, scrape: bool,
         hz: int) -> dict[str, float]:
    """CPU (% of one core) and memory (MB) over IDLE_S with `settings` in [daemon]."""
    sh = box.sh
    sh("cp /root/sparkd.toml.shipped /etc/sparkd.toml && "
       f"sed -i 's/^\\[daemon\\]$/[daemon]\\n{settings}/' /etc/sparkd.toml && "
       "systemctl restart sparkd")
    sh(f"systemctl {'start' if probe else 'stop'} {PROBE}")
    wait_serving(box)
    pid = sh("systemctl show -P MainPID sparkd").stdout.strip()
    probe_pid = sh(f"systemctl show -P MainPID {PROBE}").stdout.strip()
    time.sleep(10)  # start-up work done
    stop = threading.Event()
    scraper = threading.Thread(target=scrape_every_second, args=(box, stop), daemon=True)
    if scrape:
        scraper.start()
    t0 = time.monotonic()
    c0 = ticks(box, pid)
    p0 = ticks(box, probe_pid) if probe else 0
    time.sleep(IDLE_S)
    c1 = ticks(box, pid)
    p1 = ticks(box, probe_pid) if probe else 0
    elapsed = time.monotonic() - t0
    stop.set()
    if scrape:
        scraper.join()
    out = {"sparkd_cpu": (c1 - c0) / hz / elapsed * 100,
           "sparkd_rss": kib(box, pid, "status", "VmRSS:") / 1024,
           "probe_cpu": (p1 - p0) / hz / elapsed * 100 if probe else 0.0,
           "probe_pss": kib(box, probe_pid, "smaps_rollup", "Pss:") / 1024 if probe else 0.0,
           "probe_rss": kib(box, probe_pid, "status", "VmRSS:") / 1024 if probe else 0.0}
    if probe:
        assert sh(f"systemctl is-active {PROBE}").stdout.strip() == "active"
    return out


def main() -> int:
    print(f"machine: {machine()}")
    with sparkd_container() as box:
        hz = int(box.exec(["getconf", "CLK_TCK"]).stdout)
        box.sh("cp /etc/sparkd.toml /root/sparkd.toml.shipped")
        load = box.exec(["cat", "/proc/loadavg"]).stdout.split()[:3]
        on = idle(box, ON, probe=True, scrape=True, hz=hz)
        off = idle(box, OFF, probe=False, scrape=False, hz=hz)
        load_after = box.exec(["cat", "/proc/loadavg"]).stdout.split()[:3]
    print(f"load average before {' '.join(load)}, after {' '.join(load_after)}")
    for name, r in (("everything on", on), ("everything off", off)):
        print(f"idle {IDLE_S:.0f} s, {name}: sparkd CPU {r['sparkd_cpu']:.3f} %, RSS "
              f"{r['sparkd_rss']:.1f} MB; probe CPU {r['probe_cpu']:.3f} %, PSS "
              f"{r['probe_pss']:.1f} MB (RSS {r['probe_rss']:.1f} MB)")
    cpu = on["sparkd_cpu"] + on["probe_cpu"] - off["sparkd_cpu"]
    mem = on["sparkd_rss"] + on["probe_pss"] - off["sparkd_rss"]
    ok = [cpu <= CPU_BAR_PCT, mem <= MEM_BAR_MB]
    print(f"bar: the watch's CPU {cpu:.3f} % of one core <= {CPU_BAR_PCT} %: "
          f"{'MET' if ok[0] else 'NOT MET'}")
    print(f"bar: the watch's memory {mem:.1f} MB (sparkd's RSS + the probe's PSS over the "
          f"idle daemon) <= {MEM_BAR_MB} MB: {'MET' if ok[1] else 'NOT MET'}; with the "
          f"probe's RSS instead: {mem - on['probe_pss'] + on['probe_rss']:.1f} MB")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
