"""The pystemd adapter: method calls on one long-lived bus, signals on another.

sd-bus connections are not thread-safe, and the daemon makes blocking method calls from one
executor thread while the event loop receives signals. So there are exactly two long-lived
connections, each used by one thread only: `PystemdManager` (calls, in the systemd executor
thread) and `PystemdSignals` (signals, on the loop, integrated through the bus's file
descriptor: no polling).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Callable
from typing import Any

from pystemd.dbuslib import DBus, apply_signature, path_decode

from sparkd.errors import SystemdError
from sparkd.systemd.manager import (
    UNSET,
    JobDone,
    ResourceWeights,
    SystemdEvent,
    UnitChanged,
    UnitStatus,
)

log = logging.getLogger(__name__)

DEST = b"org.freedesktop.systemd1"
ROOT = b"/org/freedesktop/systemd1"
MANAGER_IFACE = b"org.freedesktop.systemd1.Manager"
UNIT_IFACE = b"org.freedesktop.systemd1.Unit"
SERVICE_IFACE = b"org.freedesktop.systemd1.Service"
SLICE_IFACE = b"org.freedesktop.systemd1.Slice"
PROPS_IFACE = b"org.freedesktop.DBus.Properties"
UNIT_PATH_PREFIX = b"/org/freedesktop/systemd1/unit"
LOGIN_DEST = b"org.freedesktop.login1"
LOGIN_ROOT = b"/org/freedesktop/login1"
LOGIN_MANAGER_IFACE = b"org.freedesktop.login1.Manager"
LOGIN_SESSION_IFACE = b"org.freedesktop.login1.Session"


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _version_number(text: str) -> int:
    match = re.match(r"\D*(\d+)", text)
    if not match:
        raise SystemdError(f"cannot read systemd's version from {text!r}")
    return int(match.group(1))


class PystemdManager:
    """Blocking calls to PID 1 over one connection. Use from a single thread."""

    def __init__(self) -> None:
        self._bus: DBus | None = None

    def _conn(self) -> DBus:
        if self._bus is None:
            bus = DBus()
            bus.open()
            self._bus = bus
        return self._bus

    def close(self) -> None:
        if self._bus is not None:
            self._bus.close()
            self._bus = None

    def _call(self, path: bytes, iface: bytes, method: bytes, sig: bytes, *args: Any) -> Any:
        try:
            reply = self._conn().call_method(
                DEST, path, iface, method, apply_signature(sig, list(args)) if sig else []
            )
        except Exception as exc:
            raise SystemdError(f"{method.decode()}{args!r}: {exc}") from exc
        return reply.body

    def version(self) -> int:
        try:
            raw = self._conn().get_property(DEST, ROOT, MANAGER_IFACE, b"Version", b"s")
        except Exception as exc:
            raise SystemdError(f"cannot read systemd's version: {exc}") from exc
        return _version_number(_text(raw))

    def daemon_reload(self) -> None:
        self._call(ROOT, MANAGER_IFACE, b"Reload", b"")

    def start_unit(self, name: str) -> str:
        return _text(self._call(ROOT, MANAGER_IFACE, b"StartUnit", b"ss", name.encode(),
                                b"replace"))

    def stop_unit(self, name: str) -> str:
        return _text(self._call(ROOT, MANAGER_IFACE, b"StopUnit", b"ss", name.encode(),
                                b"replace"))

    def restart_unit(self, name: str) -> str:
        return _text(self._call(ROOT, MANAGER_IFACE, b"RestartUnit", b"ss", name.encode(),
                                b"replace"))

    def reset_failed_unit(self, name: str) -> None:
        self._call(ROOT, MANAGER_IFACE, b"ResetFailedUnit", b"s", name.encode())

    def unit_status(self, name: str) -> UnitStatus:
        path = self._call(ROOT, MANAGER_IFACE, b"LoadUnit", b"s", name.encode())
        unit = self._call(path, PROPS_IFACE, b"GetAll", b"s", UNIT_IFACE)
        load_state = _text(unit.get(b"LoadState", b"not-found"))
        service: dict[bytes, Any] = {}
        if load_state == "loaded":
            service = self._call(path, PROPS_IFACE, b"GetAll", b"s", SERVICE_IFACE)
        return UnitStatus(
            name=name,
            load_state=load_state,
            active_state=_text(unit.get(b"ActiveState", b"inactive")),
            sub_state=_text(unit.get(b"SubState", b"dead")),
            main_pid=int(service.get(b"MainPID", 0)),
            n_restarts=int(service.get(b"NRestarts", 0)),
            result=_text(service.get(b"Result", b"success")),
            exec_main_status=int(service.get(b"ExecMainStatus", 0)),
        )

    def resource_weights(self, name: str) -> ResourceWeights:
        """The service's or slice's CPUWeight, IOWeight and MemoryHigh
        (org.freedesktop.systemd1.Service or .Slice properties, type t; UINT64_MAX when not
        set)."""
        path = self._call(ROOT, MANAGER_IFACE, b"LoadUnit", b"s", name.encode())
        iface = SLICE_IFACE if name.endswith(".slice") else SERVICE_IFACE
        props = self._call(path, PROPS_IFACE, b"GetAll", b"s", iface)
        return ResourceWeights(cpu_weight=int(props.get(b"CPUWeight", UNSET)),
                               io_weight=int(props.get(b"IOWeight", UNSET)),
                               memory_high=int(props.get(b"MemoryHigh", UNSET)))

    def set_resource_weights(self, name: str, weights: ResourceWeights) -> None:
        """Manager.SetUnitProperties(name, runtime=true, [(CPUWeight, t), (IOWeight, t),
        (MemoryHigh, t)]): what `systemctl set-property --runtime` sends (systemd's
        src/systemctl/systemctl-set-property.c). Runtime: the change lives in
        /run/systemd/system.control and goes at the next boot. UINT64_MAX resets a weight to
        its default and MemoryHigh to infinity (systemd.resource-control(5))."""
        args: list[Any] = apply_signature(b"sb", [name.encode(), True])
        # a(sv) built by hand as pystemd's own signature_array does (pystemd 0.15.3
        # systemd1/unit_signatures.py), whose table lacks CPUWeight and IOWeight.
        args += [(ord(b"a"), b"(sv)")]
        for prop, value in ((b"CPUWeight", weights.cpu_weight),
                            (b"IOWeight", weights.io_weight),
                            (b"MemoryHigh", weights.memory_high)):
            args += [(ord(b"r"), b"sv"), (ord(b"s"), prop), (ord(b"v"), b"t")]
            args += apply_signature(b"t", [value])
            args += [(-1, None), (-1, None)]
        args += [(-1, None)]
        try:
            self._conn().call_method(DEST, ROOT, MANAGER_IFACE, b"SetUnitProperties", args)
        except Exception as exc:
            raise SystemdError(f"SetUnitProperties({name!r}, {weights}): {exc}") from exc

    def session_types(self) -> list[str] | None:
        """The Type of every logind session (x11, wayland, tty, ...): org.freedesktop.login1
        Manager.ListSessions() -> a(susso), then each session object's Type property
        (org.freedesktop.login1(5)). None when logind does not answer (no logind: a
        container, a minimal server)."""
        try:
            sessions = self._conn().call_method(LOGIN_DEST, LOGIN_ROOT, LOGIN_MANAGER_IFACE,
                                                b"ListSessions", []).body
            return [_text(self._conn().get_property(LOGIN_DEST, s[4], LOGIN_SESSION_IFACE,
                                                    b"Type", b"s"))
                    for s in sessions]
        except Exception as exc:
            log.debug("logind did not answer: %s", exc)
            return None


def _callback(handler: Callable[[Any], None]) -> Callable[..., None]:
    def callback(msg: Any, error: Any = None, userdata: Any = None) -> None:
        try:
            handler(msg)
        except Exception:
            log.exception("handling a systemd signal failed")

    return callback


class PystemdSignals:
    """JobRemoved and PropertiesChanged from PID 1, read on the event loop."""

    def __init__(self, *, unit_filter: Callable[[str], bool]) -> None:
        self._unit_filter = unit_filter
        self._bus = DBus()
        self._bus.open()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._on_event: Callable[[SystemdEvent], None] | None = None
        self._callbacks: list[Callable[..., None]] = []

    def attach(self, on_event: Callable[[SystemdEvent], None]) -> None:
        self._on_event = on_event
        # pystemd sets attributes on the callback and keeps only a borrowed pointer to it:
        # pass plain functions, and keep them alive as long as the bus.
        self._callbacks = [_callback(self._job_removed), _callback(self._props_changed)]
        self._bus.match_signal(DEST, None, MANAGER_IFACE, b"JobRemoved", self._callbacks[0])
        self._bus.match_signal(DEST, None, PROPS_IFACE, b"PropertiesChanged", self._callbacks[1])
        # PID 1 sends most signals only while some client has subscribed; this connection is
        # that client for as long as it lives.
        self._bus.call_method(DEST, ROOT, MANAGER_IFACE, b"Subscribe", [])
        self._loop = asyncio.get_running_loop()
        self._loop.add_reader(self._bus.get_fd(), self.drain)
        self.drain()

    def drain(self) -> None:
        """Process everything sd-bus has read or can read now (callbacks run from here)."""
        for _ in range(1024):
            try:
                msg = self._bus.process()
            except Exception:
                log.exception("reading the systemd bus failed")
                return
            if msg.is_empty():
                return

    def close(self) -> None:
        if self._loop is not None:
            self._loop.remove_reader(self._bus.get_fd())
            self._loop = None
        self._bus.close()

    def _emit(self, event: SystemdEvent) -> None:
        if self._on_event is not None:
            try:
                self._on_event(event)
            except Exception:
                # sd-bus callbacks cannot raise to anyone: say it here.
                log.exception("handling %r failed", event)

    def _job_removed(self, msg: Any) -> None:
        msg.process_reply(with_headers=True)
        job_id, _job_path, unit, result = msg.body
        name = _text(unit)
        if self._unit_filter(name):
            self._emit(JobDone(job_id=int(job_id), unit=name, result=_text(result)))

    def _props_changed(self, msg: Any) -> None:
        msg.process_reply(with_headers=True)
        path = msg.headers.get("Path") or msg.headers.get(b"Path")
        if not path:
            return
        path = path if isinstance(path, bytes) else str(path).encode()
        if not path.startswith(UNIT_PATH_PREFIX + b"/"):
            return
        name = _text(path_decode(path, UNIT_PATH_PREFIX))
        if self._unit_filter(name):
            self._emit(UnitChanged(unit=name))
