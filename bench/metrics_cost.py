"""Bar (issue 13): the watch costs <= 0.5 % of one core and <= 10 MB over the idle daemon; here
the part item 6 adds, sparkd's Prometheus endpoint (`daemon.metrics_listen`).

In a booted systemd with the .deb (run as root after `make deb`), the default model serving,
sparkd's CPU and RSS over 60 s idle (bench/watch_floor.py's `idle`), four runs side by side:

    off       metrics_listen unset (the default: no endpoint)
    on        metrics_listen = "127.0.0.1:9471", nobody scraping (a listening socket only)
    scraped   the same, scraped every SCRAPE_S seconds from inside the container (Prometheus'
              default interval is 60 s; 5 s is a busy scraper), the scraper's own CPU not counted
    off       again, to see the noise between two runs of the same settings

Before the runs, one scrape of the real daemon through its real endpoint, read with
prometheus_client's parser: the endpoint is wired into `sparkd daemon` and says what it should.
"""

from __future__ import annotations

import sys

from container import machine, sparkd_container
from harness import Container
from watch_floor import CPU_BAR_PCT, IDLE_S, RSS_BAR_MB, idle

LISTEN = "127.0.0.1:9471"
SCRAPE_S = 5
SETTING = f'metrics_listen = "{LISTEN}"'
SCRAPER = ("import time, urllib.request\n"
           "while True:\n"
           f"    urllib.request.urlopen('http://{LISTEN}/metrics', timeout=5).read()\n"
           f"    time.sleep({SCRAPE_S})\n")
ONE_SCRAPE = (f"import urllib.request; print(urllib.request.urlopen('http://{LISTEN}/metrics',"
              " timeout=5).read().decode())")


def check_scrape(box: Container) -> list[str]:
    """The real daemon's metrics, parsed: the names of the families with samples."""
    from prometheus_client.parser import text_string_to_metric_families

    text = box.exec(["python3", "-c", ONE_SCRAPE]).stdout
    families = {f.name: f for f in text_string_to_metric_families(text) if f.samples}
    for needed in ("sparkd_memory_available_bytes", "sparkd_page_cache_bytes",
                   "sparkd_memory_floor_bytes", "sparkd_engine_state", "sparkd_engine_memory_bytes",
                   "sparkd_pressure_ratio", "sparkd_swaps", "sparkd_watch_actions"):
        if needed not in families:
            raise SystemExit(f"the daemon's endpoint has no {needed}: {sorted(families)}")
    return sorted(families)


def main() -> int:
    print(f"machine: {machine()}")
    with open("/proc/loadavg", encoding="ascii") as f:
        print(f"load average before: {' '.join(f.read().split()[:3])}")
    rows: list[tuple[str, float, float]] = []
    with sparkd_container() as box:
        hz = int(box.exec(["getconf", "CLK_TCK"]).stdout)
        box.sh("cp /etc/sparkd.toml /root/sparkd.toml.shipped")
        rows.append(("off", *idle(box, "", hz)))
        rows.append(("on, not scraped", *idle(box, SETTING, hz)))
        names = check_scrape(box)
        print(f"the daemon's endpoint answers: {len(names)} families: {', '.join(names)}")
        box.exec(["tee", "/root/scraper.py"], input=SCRAPER)
        box.sh("systemd-run --unit=scraper python3 /root/scraper.py")
        rows.append((f"on, scraped every {SCRAPE_S} s", *idle(box, SETTING, hz)))
        box.sh("systemctl stop scraper")
        rows.append(("off (again)", *idle(box, "", hz)))
    with open("/proc/loadavg", encoding="ascii") as f:
        print(f"load average after: {' '.join(f.read().split()[:3])}")
    print(f"\n| metrics endpoint | sparkd CPU, % of one core ({IDLE_S:.0f} s idle) | RSS MB |")
    print("| --- | --- | --- |")
    for name, cpu, rss in rows:
        print(f"| {name} | {cpu:.3f} | {rss:.1f} |")
    off_cpu = max(rows[0][1], rows[3][1])
    off_rss = min(rows[0][2], rows[3][2])
    worst_cpu = max(rows[1][1], rows[2][1]) - off_cpu
    worst_rss = max(rows[1][2], rows[2][2]) - off_rss
    ok = [worst_cpu <= CPU_BAR_PCT, worst_rss <= RSS_BAR_MB]
    print(f"bar: endpoint CPU {worst_cpu:.3f} % <= {CPU_BAR_PCT} % (worst on against the "
          f"costlier off): {'MET' if ok[0] else 'NOT MET'}")
    print(f"bar: endpoint RSS {worst_rss:.1f} MB <= {RSS_BAR_MB} MB (worst on against the "
          f"smaller off): {'MET' if ok[1] else 'NOT MET'}")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
