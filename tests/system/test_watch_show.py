"""Issue 13 item 6 in a booted systemd with the .deb: the installed daemon serves its
Prometheus metrics on daemon.metrics_listen (scraped inside the container, read with
prometheus_client's parser), moves the endpoint when a reload changes the address, and
`sparkctl status` / `sparkctl top` show the machine and leave as they should."""

from __future__ import annotations

import re

import pytest
from checks import serving, wait_for
from harness import Container
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.system

CONFIG = """
[daemon]
default_model = "small"
memory_reserve_gib = 0
health_interval_s = 1
settle_timeout_s = 2
metrics_listen = "{listen}"

[models.small]
engine = "sim"
port = 8101
load_timeout_s = 30
args = ["--load-seconds", "1", "--weights-mib", "8", "--resident-mib", "64"]
"""
SCRAPE = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
          "'http://{listen}/metrics', timeout=5).read().decode())")


def scrape(box: Container, listen: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = box.exec(["python3", "-c", SCRAPE.format(listen=listen)]).stdout
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for f in text_string_to_metric_families(text) for s in f.samples}


def answers(box: Container, listen: str) -> bool:
    return box.exec(["python3", "-c", SCRAPE.format(listen=listen)], check=False,
                    quiet=True).returncode == 0


def start_with(box: Container, listen: str) -> None:
    box.exec(["systemctl", "stop", "sparkd", "sparkd-engine@*"])
    box.exec(["tee", "/etc/sparkd.toml"], input=CONFIG.format(listen=listen))
    box.exec(["rm", "-f", "/var/lib/sparkd/state.toml"])
    box.exec(["systemctl", "start", "sparkd"])
    wait_for("small to serve", lambda: serving(box, "small"), timeout=90)


def test_the_installed_daemon_exports_and_shows_the_machine(container: Container) -> None:
    box = container
    start_with(box, "127.0.0.1:9471")

    m = scrape(box, "127.0.0.1:9471")
    assert m[("sparkd_engine_state", (("model", "small"), ("state", "active"),
                                      ("variant", "plain")))] == 1
    assert m[("sparkd_engine_healthy", (("model", "small"), ("variant", "plain")))] == 1
    assert m[("sparkd_engine_memory_bytes", (("engine", "small"),))] >= 64 << 20
    assert m[("sparkd_memory_floor_bytes", ())] == 4 << 30
    assert m[("sparkd_memory_available_bytes", ())] > 0
    assert m[("sparkd_swaps_total", (("result", "done"),))] == 1  # small's start
    assert ("sparkd_pressure_ratio", (("kind", "some"), ("resource", "cpu"),
                                      ("window", "10s"))) in m

    shown = box.exec(["sparkctl", "status"], env={"COLUMNS": "160"}).stdout
    assert "| floor 4.0 GiB" in shown
    assert "engine " in shown and "page cache " in shown
    # The lateness probe runs beside sparkd (sparkd-lateness.service); the container has no
    # graphical session to find, and no GPU.
    assert re.search(r"desktop: (headless|unknown) · timer lateness p99 [0-9.]+ ms", shown), \
        shown
    assert "watch actions: none · swaps: done 1" in shown

    top = box.exec(["sparkctl", "top", "--count", "2", "--interval", "0.2"],
                   env={"COLUMNS": "160"})
    assert top.stdout.count("small: serving, healthy") >= 2

    # A reload that changes the address moves the endpoint (at the next health tick).
    box.exec(["sed", "-i", "s/127.0.0.1:9471/127.0.0.1:9472/", "/etc/sparkd.toml"])
    box.exec(["systemctl", "reload", "sparkd"])
    wait_for("the endpoint on 9472", lambda: answers(box, "127.0.0.1:9472"), timeout=30)
    assert not answers(box, "127.0.0.1:9471")


def test_top_exits_3_when_sparkd_stops(container: Container) -> None:
    box = container
    start_with(box, "")
    # top as a unit of its own in the container (a background job of `sh -c` would not outlive
    # the exec); sparkd stopped under it once it showed a frame; how top ended.
    box.exec(["rm", "-f", "/root/top.out", "/root/top.err", "/root/top.rc"])
    box.exec(["systemd-run", "--unit=sparkctl-top", "--setenv=COLUMNS=160", "sh", "-c",
              "sparkctl top --interval 0.3 >/root/top.out 2>/root/top.err; "
              "echo $? >/root/top.rc"])

    def read(name: str) -> str:
        return box.exec(["cat", f"/root/{name}"], check=False, quiet=True).stdout

    try:
        wait_for("top's first frame", lambda: "small: serving, healthy" in read("top.out"),
                 timeout=30)
        box.exec(["systemctl", "stop", "sparkd"])
        wait_for("top to end", lambda: read("top.rc").strip() != "", timeout=30)
    finally:
        box.exec(["systemctl", "start", "sparkd"])
    assert int(read("top.rc")) == 3, read("top.err")
    assert read("top.err").startswith("sparkctl: sparkd went away: "), read("top.err")
