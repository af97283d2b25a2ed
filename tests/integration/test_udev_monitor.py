"""The udev adapter against the real netlink monitor of this machine: pyudev's Monitor read
through `loop.add_reader`, receiving uevents the test causes by writing an action to a
device's `uevent` file (Documentation/ABI/testing/sysfs-uevent), as `udevadm trigger
--action=change` does.

The development container runs no udevd, so the monitor listens to the kernel's own uevents
(source "kernel"); sparkd's default, source "udev", receives the same events after udevd has
processed them and is not exercised here. Needs root and a writable /sys; skipped otherwise.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import pytest
from fakes import build, run, started

from sparkd.daemon.udev import UdevMonitor, block_present
from sparkd.monitor.devices import DeviceEvent

FULL = "/sys/devices/virtual/mem/full"  # /dev/full: a change uevent on it does nothing
LOOP0 = Path("/sys/class/block/loop0")


def can_trigger(sys_path: str | Path) -> bool:
    return os.geteuid() == 0 and os.access(Path(sys_path, "uevent"), os.W_OK)


pytestmark = pytest.mark.skipif(not can_trigger(FULL),
                                reason="needs root and a writable /sys to cause a uevent")


async def next_event(queue: asyncio.Queue[DeviceEvent], sys_path: str) -> DeviceEvent:
    while True:
        ev = await asyncio.wait_for(queue.get(), 10)
        if ev.sys_path == sys_path:
            return ev


def test_a_real_uevent_arrives_through_the_loop() -> None:
    async def scenario() -> tuple[DeviceEvent, list[DeviceEvent]]:
        queue: asyncio.Queue[DeviceEvent] = asyncio.Queue()
        monitor = UdevMonitor(queue.put_nowait, source="kernel", subsystems=("mem",))
        try:
            scanned = monitor.scan()
            monitor.start(asyncio.get_running_loop())
            Path(FULL, "uevent").write_text("change")
            return await next_event(queue, FULL), scanned
        finally:
            monitor.close()

    ev, scanned = run(scenario())
    assert (ev.action, ev.subsystem, ev.sys_path, ev.driver) == ("change", "mem", FULL, None)
    assert (ev.properties["MAJOR"], ev.properties["MINOR"]) == ("1", "7")
    assert DeviceEvent("scan", "mem", FULL, None,
                       {"DEVNAME": "/dev/full", "MAJOR": "1", "MINOR": "7"}) in scanned


def test_events_that_arrive_before_start_are_not_lost() -> None:
    async def scenario() -> DeviceEvent:
        queue: asyncio.Queue[DeviceEvent] = asyncio.Queue()
        monitor = UdevMonitor(queue.put_nowait, source="kernel", subsystems=("mem",))
        try:
            Path(FULL, "uevent").write_text("change")  # before the reader is on the loop
            await asyncio.sleep(0.1)
            monitor.start(asyncio.get_running_loop())
            return await next_event(queue, FULL)
        finally:
            monitor.close()

    assert run(scenario()).action == "change"


def test_events_lost_to_an_overflowing_socket_are_said_and_rescanned(
        caplog: pytest.LogCaptureFixture) -> None:
    # More uevents than the netlink socket holds (a driver reload, a hub of USB devices): the
    # kernel drops the rest and the next read fails with ENOBUFS. Those events are gone (a
    # "mains back" among them left the engines stopped until the next power event): the
    # monitor says so through on_lost, once, and the reader goes on with what follows.
    async def scenario() -> tuple[int, list[DeviceEvent]]:
        queue: asyncio.Queue[DeviceEvent] = asyncio.Queue()
        lost: list[int] = []
        monitor = UdevMonitor(queue.put_nowait, source="kernel", subsystems=("mem",),
                              on_lost=lambda: lost.append(queue.qsize()))
        try:
            monitor.monitor.set_receive_buffer_size(4096)  # SO_RCVBUFFORCE: root
            for _ in range(200):  # before the reader is on the loop: they pile up
                Path(FULL, "uevent").write_text("change")
            await asyncio.sleep(0.1)
            monitor.start(asyncio.get_running_loop())
            Path(FULL, "uevent").write_text("change")  # one after: still received
            await asyncio.sleep(0.5)
            got = []
            while not queue.empty():
                got.append(queue.get_nowait())
            return len(lost), got
        finally:
            monitor.close()

    with caplog.at_level(logging.WARNING, logger="sparkd.daemon.udev"):
        lost, got = run(scenario())
    # pyudev's poll raised on the pending error without clearing it: the reader was called
    # again and again (a core spinning, a warning each time) and no event came through.
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == ["udev monitor: the socket overflowed and udev events were lost"]
    assert lost == 1
    assert 0 < len(got) < 201  # some were received, not all
    assert got[-1].sys_path == FULL  # the one after the overflow too


@pytest.mark.skipif(not can_trigger(LOOP0), reason="no loop0 to cause a block uevent on")
def test_a_real_block_event_makes_the_supervisor_look_at_the_mounts(tmp_path: Path) -> None:
    w = build(tmp_path, '[daemon]\nstate_dir = "{state}"\n[models.a]\nengine = "sim"\n'
                        'port = 9001\npath = "/srv/models/a"\n')
    looked: list[int] = []
    mountinfo = ("22 1 252:1 / / rw - ext4 /dev/vda1 rw\n"
                 "40 22 7:0 / /srv/models rw - ext4 /dev/loop0 rw\n")

    def read_mounts() -> str:
        looked.append(1)
        return mountinfo if len(looked) == 1 else mountinfo.splitlines()[0] + "\n"

    w.sup.devices.read_mounts = read_mounts
    loop0 = os.path.realpath(LOOP0)

    async def scenario() -> str | None:
        await started(w.sup)
        w.sup.devices.watch_volumes(w.sup)
        monitor = UdevMonitor(lambda ev: w.sup.devices.on_event(w.sup, ev), source="kernel",
                              subsystems=("block",))
        try:
            monitor.start(asyncio.get_running_loop())
            Path(LOOP0, "uevent").write_text("change")
            for _ in range(100):
                if len(looked) > 1:
                    break
                await asyncio.sleep(0.05)
        finally:
            monitor.close()
        return w.sup.status().daemon.swaps_paused

    paused = run(scenario())
    assert len(looked) >= 2, f"no block uevent for {loop0} reached the watch"
    assert paused == "swaps paused: the volume at /srv/models holding a is gone (unmounted)"


def test_block_present_reads_sysfs() -> None:
    present = sorted(os.listdir("/sys/dev/block"))
    if present:
        assert block_present(present[0]) is True
    assert block_present("0:45") is None  # tmpfs, NFS: no block device to lose
    assert block_present("7:99999") is False
