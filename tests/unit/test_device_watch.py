"""The udev watch inside the Supervisor, over a fake systemd: on battery the engines stop
cleanly with the clean-shutdown marker and start again with mains; the NVIDIA device gone
makes sparkd degraded with no restarts; a model volume gone pauses swaps with the reason."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import json
import logging
import time
from pathlib import Path

import pytest
from fakes import World, build, run, started
from rich.console import Console
from udev_builders import H200, h200, supply

from sparkd.config import parse_config
from sparkd.control.status import Status
from sparkd.ctl.doctor import Level, device_checks
from sparkd.ctl.status import render_status
from sparkd.errors import ConfigError, SwapRefused
from sparkd.journal import FIELDS_ATTR
from sparkd.monitor.devices import DeviceEvent
from sparkd.state import StateStore

CONFIG = """
[daemon]
default_model = "a"
state_dir = "{state}"
{extra}
[models.a]
engine = "sim"
port = 9001
path = "/srv/models/a"
[models.b]
engine = "sim"
port = 9002
path = "/srv/models/b"
"""
A, B = "sparkd-engine@a.service", "sparkd-engine@b.service"
MOUNTINFO = """\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
40 22 259:2 / /srv/models rw,noatime shared:20 - ext4 /dev/nvme1n1p1 rw
"""
MAINS_OFF = supply("AC", type="Mains", online="0")
MAINS_ON = supply("AC", type="Mains", online="1")


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Machine:
    """What the watch reads besides events: the mounts and the block devices."""

    def __init__(self) -> None:
        self.mountinfo = MOUNTINFO
        self.blocks = {"259:2": True}


def world(tmp_path: Path, extra: str = "") -> tuple[World, Clock, Machine]:
    w = build(tmp_path, CONFIG.replace("{extra}", extra))
    clock, machine = Clock(), Machine()
    w.sup.deps.clock = clock
    w.sup.devices.read_mounts = lambda: machine.mountinfo
    w.sup.devices.block_present = machine.blocks.get
    w.systemd.set("a", "active", "running", pid=41)
    return w, clock, machine


def events(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [getattr(r, FIELDS_ATTR)["SPARKD_EVENT"] for r in caplog.records
            if hasattr(r, FIELDS_ATTR)]


def test_on_battery_stops_cleanly_after_the_grace_and_mains_starts_again(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w, clock, _ = world(tmp_path, "on_battery_grace_s = 30")
    sup = w.sup
    store = StateStore(tmp_path / "state")

    async def scenario() -> None:
        await started(sup)
        sup.devices.scan(sup, [MAINS_ON])
        sup.devices.on_event(sup, MAINS_OFF)
        await sup.quiesce()
        assert ("stop", A) not in w.systemd.calls  # the grace first
        assert sup.status().daemon.on_battery == "mains supply AC offline"
        clock.t += 30
        sup.devices.evaluate_power(sup)  # what the grace timer calls
        await sup.quiesce()
        assert w.systemd.units[A].active_state == "inactive"
        state, _ = store.load()
        assert state.clean_shutdown is True  # a power cut now is not an unclean boot
        assert state.desired_model == "a"  # still wanted: it comes back with mains
        with pytest.raises(SwapRefused, match="on battery"):
            sup.request_swap("b")
        assert "swaps paused: on battery" in (sup.status().daemon.swaps_paused or "")
        sup.devices.on_event(sup, MAINS_ON)
        await sup.quiesce()
        sup.devices.close()

    with caplog.at_level(logging.INFO):
        run(scenario())
    assert [c for c in w.systemd.calls if c[1] == A] == [("stop", A), ("start", A)]
    assert w.systemd.units[A].active_state == "active"
    state, _ = store.load()
    assert state.clean_shutdown is False
    assert sup.status().daemon.swaps_paused is None
    assert sup.status().daemon.on_battery is None
    got = events(caplog)
    for name in ("power_lost", "engines_held", "clean_shutdown_marked", "power_restored",
                 "engines_resumed"):
        assert name in got


def test_lost_events_are_read_again_from_a_scan(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # The monitor's socket overflowed while mains came back and the NVIDIA device went: the
    # events are gone, a scan of what is there now stands in for them (a supply no longer
    # listed leaves the table; a known NVIDIA device not listed is gone).
    w, _, _ = world(tmp_path, "on_battery_grace_s = 0")
    sup = w.sup
    gpu = DeviceEvent("scan", "pci", H200["sys_path"], "nvidia", {})
    ups = supply("UPS1", type="UPS", online="0", status="Discharging")

    async def scenario() -> None:
        sup.devices.scan(sup, [MAINS_ON, ups, gpu])
        await started(sup)
        sup.devices.evaluate_power(sup)
        await sup.quiesce()
        assert w.systemd.units[A].active_state == "inactive"  # on battery: stopped
        # Lost: the UPS unplugged (its remove event) and the GPU unbound.
        sup.devices.rescan(sup, [dataclasses.replace(MAINS_ON, action="scan")])
        await sup.quiesce()
        assert sup.status().daemon.on_battery is None
        assert "NVIDIA device" in (sup.status().daemon.degraded or "")
        sup.devices.close()

    with caplog.at_level(logging.INFO):
        run(scenario())
    assert "udev_events_lost" in events(caplog)
    assert {"power_restored", "gpu_gone"} <= set(events(caplog))


def test_ignore_keeps_the_engines_running(tmp_path: Path) -> None:
    w, clock, _ = world(tmp_path, 'on_battery = "ignore"\non_battery_grace_s = 0')

    async def scenario() -> None:
        await started(w.sup)
        w.sup.devices.on_event(w.sup, MAINS_OFF)
        clock.t += 3600
        w.sup.devices.evaluate_power(w.sup)
        await w.sup.quiesce()
        w.sup.devices.close()

    run(scenario())
    assert ("stop", A) not in w.systemd.calls
    assert w.sup.status().daemon.on_battery == "mains supply AC offline"
    assert w.sup.status().daemon.swaps_paused is None


def test_the_grace_timer_fires_on_the_loop(tmp_path: Path) -> None:
    """No one calls evaluate_power: the timer armed by the event does."""
    w, _, _ = world(tmp_path, "on_battery_grace_s = 0.05")
    w.sup.deps.clock = time.monotonic

    async def scenario() -> None:
        await started(w.sup)
        w.sup.devices.on_event(w.sup, MAINS_OFF)
        await asyncio.sleep(0.3)
        await w.sup.quiesce()
        w.sup.devices.close()

    run(scenario())
    assert ("stop", A) in w.systemd.calls


def test_the_gpu_gone_is_degraded_without_a_restart_storm(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w, _, _ = world(tmp_path)
    sup = w.sup
    gpu = DeviceEvent("scan", "pci", H200["sys_path"], "nvidia", {})

    async def scenario() -> None:
        sup.devices.scan(sup, [gpu])
        await started(sup)
        sup.devices.on_event(sup, h200("unbind", drop=("DRIVER",)))
        await sup.quiesce()
        status = sup.status()
        assert status.daemon.degraded == ("NVIDIA device 0000:00:06.0 unbound from its driver "
                                          "(pci); engines stopped until it is back")
        assert "NVIDIA device 0000:00:06.0" in sup.status_line()
        assert w.systemd.units[A].active_state == "inactive"
        # Health checks while it is gone restart nothing, a swap is refused.
        for _ in range(5):
            await sup.check_health()
        with pytest.raises(SwapRefused, match="swaps paused: NVIDIA device"):
            sup.request_swap("a")
        sup.devices.on_event(sup, h200("bind"))
        await sup.quiesce()

    with caplog.at_level(logging.INFO):
        run(scenario())
    assert [c for c in w.systemd.calls if c[1] == A] == [("stop", A), ("start", A)]
    assert sup.status().daemon.degraded is None
    assert {"gpu_gone", "gpu_back", "engines_resumed"} <= set(events(caplog))


def test_a_model_volume_gone_pauses_swaps_with_the_reason(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w, _, machine = world(tmp_path)
    sup = w.sup
    why = ("swaps paused: the volume at /srv/models holding a, b is gone (block device "
           "/dev/nvme1n1p1 (259:2) removed)")

    async def scenario() -> None:
        sup.devices.watch_volumes(sup)
        await started(sup)
        machine.blocks["259:2"] = False  # the drive is pulled: a block remove event
        sup.devices.on_event(sup, DeviceEvent("remove", "block", "/sys/block/nvme1n1/nvme1n1p1",
                                              None, {"MAJOR": "259", "MINOR": "2"}))
        assert sup.status().daemon.swaps_paused == why
        with pytest.raises(SwapRefused) as refused:
            sup.request_swap("b")
        assert refused.value.message == why
        assert w.systemd.units[A].active_state == "active"  # it serves from memory
        machine.blocks["259:2"] = True
        await sup.check_health()  # the health timer looks at the mounts too
        assert sup.status().daemon.swaps_paused is None
        # An unmount sends no uevent: the health timer sees it.
        machine.mountinfo = MOUNTINFO.splitlines()[0] + "\n"
        await sup.check_health()
        assert "is gone (unmounted)" in (sup.status().daemon.swaps_paused or "")
        machine.mountinfo = MOUNTINFO
        await sup.check_health()
        assert sup.request_swap("b") is not None
        await sup.quiesce()

    with caplog.at_level(logging.INFO):
        run(scenario())
    assert events(caplog).count("volume_gone") == 2
    assert events(caplog).count("volume_back") == 2


@pytest.mark.parametrize(("line", "message"), [
    ('on_battery = "halt"', 'daemon.on_battery: expected one of stop, ignore'),
    ("on_battery_grace_s = -1", "daemon.on_battery_grace_s: expected a number from 0 to"),
    ('on_batery = "stop"', "on_battery"),  # did you mean
])
def test_config_keys_are_checked(tmp_path: Path, line: str, message: str) -> None:
    path = tmp_path / "sparkd.toml"
    with pytest.raises(ConfigError) as info:
        parse_config(f"[daemon]\n{line}\n", source=path)
    assert str(path) in info.value.message and message in info.value.message


def test_config_defaults() -> None:
    c = parse_config("", source=Path("/etc/sparkd.toml"))
    assert (c.daemon.on_battery, c.daemon.on_battery_grace_s) == ("stop", 30.0)


def test_status_and_doctor_show_what_the_watch_holds(tmp_path: Path) -> None:
    """The status the real Supervisor sends, with the GPU gone and a volume gone, read back
    through the schema and rendered by sparkctl status and doctor."""
    w, _, machine = world(tmp_path)
    sup = w.sup

    async def scenario() -> Status:
        sup.devices.scan(sup, [DeviceEvent("scan", "pci", H200["sys_path"], "nvidia", {}),
                               MAINS_ON])
        sup.devices.watch_volumes(sup)
        await started(sup)
        sup.devices.on_event(sup, MAINS_OFF)
        machine.mountinfo = MOUNTINFO.splitlines()[0] + "\n"
        sup.devices.check_volumes(sup)
        sup.devices.on_event(sup, h200("unbind"))
        await sup.quiesce()
        sup.devices.close()
        return Status.from_json(json.loads(json.dumps(sup.status().to_json())))

    status = run(scenario())
    out = io.StringIO()
    render_status(status, Console(file=out, width=200, color_system=None))
    text = out.getvalue()
    assert ("degraded: NVIDIA device 0000:00:06.0 unbound from its driver (pci); engines "
            "stopped until it is back") in text
    assert "on battery: mains supply AC offline" in text
    assert ("swaps refused: swaps paused: the volume at /srv/models holding a, b is gone "
            "(unmounted)") in text
    d = status.daemon
    checks = {c.id: c for c in device_checks(d)}
    assert checks["gpu_present"].level is Level.FAIL
    assert checks["power"].level is Level.WARN
    assert "swaps" not in checks  # said by the GPU's check already
    volume_only = dataclasses.replace(d, degraded=None, on_battery=None)
    assert device_checks(volume_only)[0].id == "swaps"
