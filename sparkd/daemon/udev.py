"""The udev adapter: pyudev's netlink monitor read on the event loop, never in a thread.

pyudev documents `Monitor.fileno()` as "the file descriptor associated with this monitor ...
which can be watched and select()ed", and `Monitor.poll(timeout)` with "If 0, this method just
polls and will never block" (pyudev 0.24.5, src/pyudev/monitor.py). So the descriptor goes
to `loop.add_reader`, and each time it is readable every waiting event is taken with
`poll(timeout=0)` and handed on as a plain `DeviceEvent` (sparkd.monitor.devices, pure) to the
callback. pyudev's own `MonitorObserver` is a thread: not used.

`source="udev"` (the default) receives events after udevd has processed them (device nodes
exist, rules applied); `source="kernel"` receives the kernel's own uevents, which is what a
machine or container without udevd has (the tests use it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Callable
from typing import Any

from sparkd.monitor.devices import SUBSYSTEMS, DeviceEvent

log = logging.getLogger(__name__)

# Properties copied out of an event: what the pure rules read, and a few to name a device.
KEPT_PREFIXES = ("POWER_SUPPLY_", "PCI_", "MAJOR", "MINOR", "DEVNAME", "DEVTYPE", "DRIVER")


def event_of(device: Any, action: str | None = None) -> DeviceEvent:
    """A pyudev Device as the pure rules read it. A drm device has no driver of its own: its
    parent pci device's is used (the nvidia driver binds the pci device)."""
    driver = device.driver
    if driver is None and device.subsystem == "drm":
        try:
            parent = device.find_parent("pci")
        except (LookupError, OSError):  # pyudev's DeviceNotFoundError is a LookupError
            parent = None
        driver = parent.driver if parent is not None else None
    props = {k: v for k, v in device.properties.items() if k.startswith(KEPT_PREFIXES)}
    return DeviceEvent(action or device.action or "scan", device.subsystem or "",
                       device.sys_path, driver, props)


def block_present(devnum: str) -> bool | None:
    """Whether the block device MAJOR:MINOR exists (/sys/dev/block; Documentation/ABI/stable/
    sysfs-dev). None for a devnum that was never a block device (major 0: tmpfs, NFS...)."""
    if devnum.split(":", 1)[0] == "0":
        return None
    return os.path.exists(f"/sys/dev/block/{devnum}")


class UdevMonitor:
    """pyudev's monitor on the loop: `scan()` lists the devices there now, `start(loop)` hands
    every later event to `on_event` on the loop thread."""

    def __init__(self, on_event: Callable[[DeviceEvent], None], *, source: str = "udev",
                 subsystems: tuple[str, ...] = SUBSYSTEMS) -> None:
        import pyudev

        self.on_event = on_event
        self.subsystems = subsystems
        self.context = pyudev.Context()
        self.monitor = pyudev.Monitor.from_netlink(self.context, source=source)
        for subsystem in subsystems:
            self.monitor.filter_by(subsystem)
        # Receiving starts now: events from here on wait in the socket until start().
        self.monitor.start()
        self._loop: asyncio.AbstractEventLoop | None = None

    def scan(self) -> list[DeviceEvent]:
        """Every device of the watched subsystems there now (action "scan")."""
        out = []
        for subsystem in self.subsystems:
            for device in self.context.list_devices(subsystem=subsystem):
                out.append(event_of(device, "scan"))
        return out

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self.monitor.fileno(), self._readable)
        self._readable()  # what arrived before

    def _readable(self) -> None:
        while True:
            try:
                device = self.monitor.poll(timeout=0)
            except OSError as exc:  # ENOBUFS: the socket overflowed; events were lost
                log.warning("udev monitor: %s", exc)
                return  # the descriptor stays readable while anything is left
            if device is None:
                return
            try:
                self.on_event(event_of(device))
            except Exception:  # one bad event never takes the reader down
                log.exception("handling a udev event failed")

    def close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.monitor.fileno())
            self._loop = None
