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
import errno
import logging
import os
import socket
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
                 subsystems: tuple[str, ...] = SUBSYSTEMS,
                 on_lost: Callable[[], None] | None = None) -> None:
        import pyudev

        self.on_event = on_event
        # Called (on the loop, after what could still be read) when the socket overflowed and
        # the kernel dropped events: what they said must be read again (a scan).
        self.on_lost = on_lost
        self.subsystems = subsystems
        self.context = pyudev.Context()
        self.monitor = pyudev.Monitor.from_netlink(self.context, source=source)
        for subsystem in subsystems:
            self.monitor.filter_by(subsystem)
        # Receiving starts now: events from here on wait in the socket until start().
        self.monitor.start()
        # The monitor's descriptor as a socket of its own (a dup): to read and clear SO_ERROR.
        self._sock = socket.socket(fileno=os.dup(self.monitor.fileno()))
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
        lost = False
        while True:
            try:
                device = self.monitor.poll(timeout=0)
            except OSError as exc:
                # The socket overflowed (the kernel dropped events: ENOBUFS) or failed. pyudev
                # 0.24.5's poll raises "Error while polling fd" on POLLERR without reading the
                # error (src/pyudev/_os/poll.py, `Poll._parse_events`), so it stays pending: every
                # poll raised again and the loop called this reader again at once, for ever
                # (a core spinning, no udev event seen again). Reading SO_ERROR clears it.
                pending = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if pending == errno.ENOBUFS:
                    lost = True  # said once, after what is still queued is read
                    continue
                if pending:
                    log.warning("udev monitor: %s", os.strerror(pending))
                    continue
                log.warning("udev monitor: %s", exc)
                break
            if device is None:
                break
            try:
                self.on_event(event_of(device))
            except Exception:  # one bad event never takes the reader down
                log.exception("handling a udev event failed")
        if lost:
            log.warning("udev monitor: the socket overflowed and udev events were lost")
            if self.on_lost is not None:
                try:
                    self.on_lost()
                except Exception:
                    log.exception("reading the devices again after lost udev events failed")

    def close(self) -> None:
        if self._loop is not None:
            with contextlib.suppress(ValueError, OSError):
                self._loop.remove_reader(self.monitor.fileno())
            self._loop = None
        self._sock.close()
