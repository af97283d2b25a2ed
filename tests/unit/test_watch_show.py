"""Issue 13 item 6, shown: the status's `machine` record built by the real Supervisor (over a
fake systemd), sparkctl's memory bar and machine lines, the metrics families of a status, and
`daemon.metrics_listen`'s checks."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import status_builders as sb
from fakes import build, run, started
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from rich.console import Console
from udev_builders import H200, h200

from sparkd.config import parse_config
from sparkd.control.status import Status
from sparkd.ctl.machine_view import floor_cell, memory_segments, render_machine
from sparkd.ctl.status import render_status
from sparkd.daemon.metrics import StatusCollector
from sparkd.errors import ConfigError
from sparkd.monitor.desktop import Presence
from sparkd.monitor.devices import DeviceEvent
from sparkd.monitor.floor import GIB

CONFIG = """
[daemon]
default_model = "a"
state_dir = "{state}"
memory_floor_gib = 4
memory_floor_samples = 1
[models.a]
engine = "sim"
port = 9001
[models.b]
engine = "sim"
port = 9002
"""


def text_of(status: Status, *, now: float = 100.0) -> str:
    out = io.StringIO()
    render_machine(status, Console(file=out, width=200, color_system=None), now=now)
    return out.getvalue()


# -- the record, from the real Supervisor ----------------------------------------------------

def test_a_floor_stop_shows_in_the_machine_record_and_survives_the_codec(
        tmp_path: Path) -> None:
    w = build(tmp_path, CONFIG)
    w.systemd.set("a", "active", "running", pid=41)
    w.systemd.set("b", "active", "running", pid=42)
    memory = {41: 30 * GIB, 42: 10 * GIB}
    w.sup.watch.engine_memory = memory.get
    w.sup.watch.read_available = lambda: 2 * GIB

    async def scenario() -> Status:
        await started(w.sup)
        await w.sup.check_health()  # baselines
        memory[42] = 20 * GIB  # b grows
        await w.sup.watch.floor_sample(w.sup)
        await w.sup.quiesce()
        return w.sup.status()

    status = run(scenario())
    machine = status.machine
    assert machine is not None
    assert machine.floor_bytes == 4 * GIB
    assert machine.engine_memory_bytes == {"a": 30 * GIB}  # b is stopped now
    assert [(a.kind, a.model) for a in machine.actions] == [("memory_floor_stop", "b")]
    assert "MemAvailable 2.0 GiB under the floor of 4.0 GiB, it held 20.0 GiB" in (
        machine.actions[0].detail)
    assert machine.action_counts == {"memory_floor_stop": 1}
    # The ladder looked for a desktop on the health tick: the fake systemd has no logind and
    # there is no GPU, so nothing could say (not "headless"); no lateness probe reports here.
    assert machine.desktop == "unknown" and machine.lateness_p99_ms is None
    # What the daemon sends is what sparkctl reads back.
    assert Status.from_json(status.to_json()) == status


def test_swaps_are_counted_by_how_they_ended(tmp_path: Path) -> None:
    w = build(tmp_path, CONFIG)

    async def scenario() -> Status:
        await started(w.sup)  # a's start is a swap from nothing
        return w.sup.status()

    machine = run(scenario()).machine
    assert machine is not None and machine.swaps == {"done": 1}


def test_the_lateness_and_desktop_readings_are_passed_on(tmp_path: Path) -> None:
    w = build(tmp_path, CONFIG)
    w.sup.watch.ladder.lateness_ms = 3.25
    w.sup.watch.ladder.presence = Presence(present=True, why="a wayland session")
    machine = w.sup.status().machine
    assert machine is not None
    assert (machine.lateness_p99_ms, machine.desktop) == (3.25, "present")


# -- the memory bar -----------------------------------------------------------------------

def test_the_bar_splits_memory_and_its_cells_add_up() -> None:
    segs = memory_segments(total=128 * GIB, available=40 * GIB, page_cache=20 * GIB,
                           engine=60 * GIB, width=64)
    assert [(s.name, s.nbytes // GIB, s.cells) for s in segs] == [
        ("engine", 60, 30), ("other", 28, 14), ("page cache", 20, 10), ("free", 20, 10)]


def test_the_bar_clamps_what_overlaps() -> None:
    # An engine cgroup counts cache it caused: more than the used part; a cache larger than
    # what is available. Neither may push the bar past its width.
    segs = memory_segments(total=16 * GIB, available=4 * GIB, page_cache=10 * GIB,
                           engine=15 * GIB, width=10)
    assert [(s.name, s.nbytes // GIB) for s in segs] == [
        ("engine", 12), ("other", 0), ("page cache", 4), ("free", 0)]
    assert sum(s.cells for s in segs) == 10
    assert sum(s.cells for s in memory_segments(0, 0, 0, 0, width=7)) == 7


def test_the_floor_mark_sits_where_available_memory_crosses_it() -> None:
    assert floor_cell(128 * GIB, 32 * GIB, width=64) == 48
    assert floor_cell(128 * GIB, 0, width=64) is None


def test_status_shows_the_bar_pressure_gpu_desktop_and_actions() -> None:
    status = sb.status(
        memory=sb.memory(), pressure={"cpu": sb.pressure(12.5, None), "memory": sb.pressure()},
        gpu=sb.gpu(),
        machine=sb.machine(
            lateness_p99_ms=2.5, desktop="present",
            actions=(sb.action("memory_floor_stop", "b", at=40.0, detail="stopped: x"),
                     sb.action("liveness_restart", "a", at=90.0, detail="restarted: y")),
            action_counts={"memory_floor_stop": 1, "liveness_restart": 1}, swaps={"done": 3}))
    text = text_of(status)
    assert ("engine 60.0 GiB · other 28.0 GiB · page cache 20.0 GiB · free 20.0 GiB · "
            "| floor 4.0 GiB") in text
    assert "pressure (avg10): cpu some 12.5% · memory some 1.0% full 0.5%" in text
    assert "desktop: present · timer lateness p99 2.5 ms" in text
    assert ("gpu 0: NVIDIA GB10, memory: unified (see above), busy 87%, memory busy 3%, "
            "61 °C, 48.2 W") in text
    assert "watch actions: liveness_restart 1, memory_floor_stop 1 · swaps: done 3" in text
    lines = text.splitlines()
    newest = lines.index("  10s ago liveness_restart a: restarted: y")
    assert lines[newest + 1] == "  1m00s ago memory_floor_stop b: stopped: x"


def test_status_says_n_a_for_what_is_not_read() -> None:
    status = sb.status(memory=sb.memory(), gpu=sb.gpu(utilization_pct=None, temperature_c=None,
                                                      power_w=None, memory_utilization_pct=None))
    text = text_of(status)
    assert "desktop: unknown · timer lateness n/a" in text
    assert "pressure: n/a" in text
    assert "busy n/a, memory busy n/a, n/a, n/a" in text
    assert "engine 0.0 GiB" in text  # no machine record: an older daemon


def test_render_status_includes_the_machine_part() -> None:
    out = io.StringIO()
    render_status(sb.status(memory=sb.memory(), machine=sb.machine()),
                  Console(file=out, width=200, color_system=None))
    assert "| floor 4.0 GiB" in out.getvalue()


# -- the metrics of a status --------------------------------------------------------------

def scrape_of(status: Status) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    from prometheus_client import generate_latest

    registry = CollectorRegistry(auto_describe=False)
    registry.register(StatusCollector(lambda: status))
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_the_metrics_of_a_status() -> None:
    status = sb.status(
        engines=[sb.engine("a", 9001), sb.engine("b", 9002, active_state="failed",
                                                 healthy=False, n_restarts=4)],
        memory=sb.memory(), pressure={"memory": sb.pressure(25.0, 10.0)}, gpu=sb.gpu(),
        machine=sb.machine(lateness_p99_ms=2.5, desktop="headless",
                           action_counts={"memory_floor_stop": 2}, swaps={"rolled_back": 1}))
    m = scrape_of(status)
    assert m[("sparkd_memory_available_bytes", ())] == 40 * GIB
    assert m[("sparkd_page_cache_bytes", ())] == 20 * GIB
    assert m[("sparkd_memory_floor_bytes", ())] == 4 * GIB
    assert m[("sparkd_engine_memory_bytes", (("engine", "a"),))] == 60 * GIB
    assert m[("sparkd_pressure_ratio", (("kind", "full"), ("resource", "memory"),
                                        ("window", "10s")))] == 0.1
    gpu = (("gpu", "0"), ("name", "NVIDIA GB10"))
    assert m[("sparkd_gpu_utilization_ratio", gpu)] == 0.87
    assert m[("sparkd_gpu_memory_utilization_ratio", gpu)] == 0.03
    assert m[("sparkd_gpu_power_watts", gpu)] == 48.25
    assert m[("sparkd_gpu_temperature_celsius", gpu)] == 61
    assert m[("sparkd_engine_state", (("model", "b"), ("state", "failed"),
                                      ("variant", "plain")))] == 1
    assert m[("sparkd_engine_state", (("model", "b"), ("state", "active"),
                                      ("variant", "plain")))] == 0
    assert m[("sparkd_engine_healthy", (("model", "a"), ("variant", "plain")))] == 1
    assert m[("sparkd_engine_restarts", (("model", "b"), ("variant", "plain")))] == 4
    assert m[("sparkd_watch_actions_total", (("kind", "memory_floor_stop"),))] == 2
    assert m[("sparkd_watch_actions_total", (("kind", "liveness_restart"),))] == 0
    assert m[("sparkd_swaps_total", (("result", "rolled_back"),))] == 1
    assert m[("sparkd_timer_lateness_p99_seconds", ())] == 0.0025
    assert m[("sparkd_desktop", (("state", "headless"),))] == 1


def test_unsupported_readings_are_no_sample_never_zero() -> None:
    m = scrape_of(sb.status(gpu=sb.gpu(temperature_c=None, power_w=None)))
    names = {name for name, _ in m}
    assert "sparkd_gpu_utilization_ratio" in names
    assert not names & {"sparkd_gpu_power_watts", "sparkd_gpu_temperature_celsius",
                        "sparkd_timer_lateness_p99_seconds", "sparkd_memory_floor_bytes"}


# -- daemon.metrics_listen ----------------------------------------------------------------

def listen(value: str) -> str:
    return parse_config(f'[daemon]\nmetrics_listen = "{value}"\n',
                        source=Path("/etc/sparkd.toml")).daemon.metrics_listen


def test_metrics_listen_takes_a_loopback_address_or_nothing() -> None:
    assert parse_config("", source=Path("/etc/sparkd.toml")).daemon.metrics_listen == ""
    assert listen("127.0.0.1:9471") == "127.0.0.1:9471"
    assert listen("[::1]:9471") == "[::1]:9471"
    assert listen("localhost:9471") == "localhost:9471"


@pytest.mark.parametrize(("value", "says"), [
    ("9471", 'HOST:PORT such as "127.0.0.1:9471", or "" for no metrics endpoint'),
    ("127.0.0.1:0", "HOST:PORT"),
    ("127.0.0.1:http", "HOST:PORT"),
    ("0.0.0.0:9471", "a loopback address such as"),
    ("192.168.1.5:9471", "SSH tunnel"),
])
def test_metrics_listen_refuses_with_file_key_and_fix(value: str, says: str) -> None:
    with pytest.raises(ConfigError) as err:
        listen(value)
    assert err.value.message.startswith("/etc/sparkd.toml: daemon.metrics_listen: expected ")
    assert says in err.value.message
    assert f'got "{value}"' in err.value.message


# -- sparkctl top's loop on a terminal ----------------------------------------------------

def test_top_redraws_in_place_on_a_terminal() -> None:
    from sparkd.ctl.top import watch

    out = io.StringIO()
    console = Console(file=out, width=120, force_terminal=True, color_system=None)
    statuses = iter([sb.status(daemon=sb.daemon(status_line=f"frame {i}"), memory=sb.memory())
                     for i in range(3)])
    slept: list[float] = []
    shown = watch(lambda: next(statuses), console, interval_s=0.5, count=3,
                  gateway=lambda: None, sleep=slept.append)
    assert shown == 3 and slept == [0.5, 0.5]
    text = out.getvalue()
    assert all(f"frame {i}" in text for i in range(3))
    assert "\x1b[2K" in text  # rich.live erased the last frame's lines to draw the next


def test_top_lets_the_daemons_absence_through() -> None:
    from sparkd.ctl.top import watch
    from sparkd.errors import DaemonUnreachable

    def gone() -> Status:
        raise DaemonUnreachable("sparkd went away")

    console = Console(file=io.StringIO(), force_terminal=True)
    with pytest.raises(DaemonUnreachable):
        watch(gone, console, interval_s=0.1, count=None, gateway=lambda: None)


NVML = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"


@pytest.mark.parametrize(("fixture", "util", "mem_util", "power", "temp"), [
    ("h200-decode.json", 1.0, 0.99, 564.29, 47),  # captured: a memory-bound decode loop
    ("h200-spin.json", None, None, None, None),    # captured: a spinning kernel
])
def test_gpu_metrics_from_captured_nvml_answers(fixture: str, util: float | None,
                                                mem_util: float | None, power: float | None,
                                                temp: int | None) -> None:
    """The reader, the report and the metrics over NVML's real answers (an H200 capture):
    what NVML said is what Prometheus gets, scaled to ratios."""
    import json

    from sparkd.daemon.report import gpus_record
    from sparkd.monitor.nvml import FixtureNvml, read

    doc = json.loads((NVML / fixture).read_text())
    snap = read(FixtureNvml(doc["samples"][len(doc["samples"]) // 2]["captured"]))
    g = snap.gpus[0]
    m = scrape_of(sb.status(gpu=gpus_record(snap)))
    labels = (("gpu", "0"), ("name", "NVIDIA H200"))
    assert g.utilization_pct is not None and g.memory_utilization_pct is not None
    assert m[("sparkd_gpu_utilization_ratio", labels)] == g.utilization_pct / 100
    assert m[("sparkd_gpu_memory_utilization_ratio", labels)] == g.memory_utilization_pct / 100
    assert m[("sparkd_gpu_power_watts", labels)] == g.power_w
    assert m[("sparkd_gpu_temperature_celsius", labels)] == g.temperature_c
    if util is not None:  # the middle sample of the decode capture, read by hand
        assert (g.utilization_pct / 100, g.memory_utilization_pct / 100, g.power_w,
                g.temperature_c) == (util, mem_util, power, temp)


def test_a_gb10_shaped_reading_has_no_gpu_memory_metric_and_shows_unified() -> None:
    import json

    from sparkd.daemon.report import gpus_record
    from sparkd.monitor.nvml import FixtureNvml, read

    doc = json.loads((NVML / "gb10-constructed.json").read_text())
    gpus = gpus_record(read(FixtureNvml(doc["captured"])))
    status = sb.status(memory=sb.memory(), gpu=gpus)
    assert "memory: unified (see above), busy 87%, memory busy 0%, 61 °C, 48.2 W" in (
        text_of(status))
    assert not any("memory_used" in name for name, _ in scrape_of(status))


def test_a_desktop_state_outside_the_three_is_refused_by_name() -> None:
    from sparkd.errors import SchemaError

    doc = sb.status(machine=sb.machine(desktop="present")).to_json()
    assert Status.from_json(doc).machine == sb.machine(desktop="present")
    doc["machine"]["desktop"] = "absent"
    with pytest.raises(SchemaError, match=r"status\.machine\.desktop"):
        Status.from_json(doc)


def test_a_udev_stop_is_a_watch_action(tmp_path: Path) -> None:
    """The NVIDIA device unbound: the udev watch stops the engine, and status and the
    metrics say so."""
    w = build(tmp_path, CONFIG)
    w.systemd.set("a", "active", "running", pid=41)

    async def scenario() -> Status:
        w.sup.devices.scan(w.sup, [DeviceEvent("scan", "pci", H200["sys_path"], "nvidia", {})])
        await started(w.sup)
        w.sup.devices.on_event(w.sup, h200("unbind", drop=("DRIVER",)))
        await w.sup.quiesce()
        status = w.sup.status()
        w.sup.devices.close()
        return status

    status = run(scenario())
    assert status.machine is not None
    assert [(a.kind, a.model) for a in status.machine.actions] == [("gpu_stop", "a")]
    assert status.machine.actions[0].detail.startswith("stopped: NVIDIA device 0000:00:06.0 "
                                                       "unbound from its driver")
    assert scrape_of(status)[("sparkd_watch_actions_total", (("kind", "gpu_stop"),))] == 1
