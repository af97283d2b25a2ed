"""The Supervisor: the one owner of the daemon's state, driven by events on one event loop.

Adapters (systemd signals, the control socket, timers, health probes) call into it on the loop
thread; blocking work (sd-bus calls) goes through `SystemdCall`, which runs it in the systemd
executor thread with a timeout, so the loop (and with it the watchdog ping) never blocks.

Daemon life cycle::

    starting ──reconcile units, adopt or start the desired engine──▶ running
    running  ──SIGHUP: valid config──▶ running (units reconciled again)
    running  ──SIGHUP: invalid config──▶ running (previous config kept, error in STATUS)
    running  ──SIGTERM──▶ stopping ──state saved with clean_shutdown──▶ (exit 0)
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sparkd import __version__
from sparkd.config import Config, ModelConfig, load_config
from sparkd.control.protocol import Request
from sparkd.engine.health import ProbeResult
from sparkd.errors import BadRequest, ConfigError, SparkdError, StateError
from sparkd.journal import event
from sparkd.monitor.memory import MemInfo
from sparkd.state import State, StateStore
from sparkd.systemd.manager import JobDone, SystemdEvent, SystemdManager, UnitStatus
from sparkd.units.render import render_units

log = logging.getLogger(__name__)

T = TypeVar("T")

SUBSCRIBER_QUEUE = 256
SUBSCRIBER_KEEPALIVE_S = 30.0

SystemdCall = Callable[[Callable[[SystemdManager], T]], Awaitable[T]]
Probe = Callable[[str], Awaitable[ProbeResult]]
StatusSink = Callable[[str], None]
ApplyUnits = Callable[[Config, int, Callable[[], None]], Mapping[str, Any]]


class DaemonState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


class Notifier(Protocol):
    def notify(self, state: str) -> None: ...


@dataclass(slots=True)
class EngineView:
    """What the daemon knows about one engine, refreshed from signals and probes."""

    model: ModelConfig
    unit: UnitStatus
    health: ProbeResult | None = None
    health_failures: int = 0


@dataclass(slots=True)
class Deps:
    """Everything the Supervisor touches outside itself, passed in by the composition root."""

    systemd: SystemdCall[Any]
    apply_units: ApplyUnits
    store: StateStore
    notifier: Notifier
    probe: Probe
    meminfo: Callable[[], MemInfo]
    boot_id: str
    clock: Callable[[], float] = time.monotonic
    wall_clock: Callable[[], float] = time.time


@dataclass(slots=True)
class _Reload:
    ok: bool
    message: str
    at: float = field(default=0.0)


class Supervisor:
    def __init__(self, config: Config, deps: Deps) -> None:
        self.config = config
        self.deps = deps
        self.state = State()
        self.daemon_state = DaemonState.STARTING
        self.engines: dict[str, EngineView] = {}
        self.systemd_version = 0
        self.started_at = deps.clock()
        self.started_wall = deps.wall_clock()
        self.state_warning: str | None = None
        self.last_reload: _Reload | None = None
        self._refresh_pending: set[str] = set()
        self._refresh_task: asyncio.Task[None] | None = None
        self._status_line = ""
        self._published_digest: tuple[Any, ...] = ()
        self._subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    # -- start-up -------------------------------------------------------------------------

    async def start(self) -> None:
        state, warning = self.deps.store.load()
        self.state_warning = warning
        if warning:
            event(log, "state_set_aside", "%s", warning, level=logging.ERROR)
        previous_boot, clean = state.boot_id, state.clean_shutdown
        if previous_boot and previous_boot != self.deps.boot_id and not clean:
            event(
                log,
                "unclean_shutdown",
                "the previous boot %s ended without a clean sparkd stop",
                previous_boot,
                level=logging.WARNING,
            )
        self.state = state.replace(boot_id=self.deps.boot_id, clean_shutdown=False)
        if self.state.desired_model not in self.config.models:
            if self.state.desired_model is not None:
                log.warning(
                    "desired model %r is no longer configured; using the default %r",
                    self.state.desired_model,
                    self.config.daemon.default_model,
                )
            self.state = self.state.replace(desired_model=self.config.daemon.default_model)
        self.systemd_version = await self.deps.systemd(lambda m: m.version())
        await self.apply_config()
        await self.converge()
        self._save_state()
        self.daemon_state = DaemonState.RUNNING
        self.update_status()
        self.deps.notifier.notify("READY=1")

    async def apply_config(self) -> None:
        """Render and reconcile the engine units for the current config."""
        config, version = self.config, self.systemd_version

        def apply(m: SystemdManager) -> Mapping[str, Any]:
            return self.deps.apply_units(config, version, m.daemon_reload)

        result = await self.deps.systemd(apply)
        if result.get("changed"):
            event(log, "units_reconciled", "engine units reconciled: %s", _describe(result))
        self.engines = {
            m.name: self.engines.get(m.name) or EngineView(model=m, unit=UnitStatus(m.unit_name))
            for m in config.supervised_models
        }
        for name, view in self.engines.items():
            view.model = config.models[name]
        await self.refresh_units(list(self.engines))

    async def converge(self) -> None:
        """Adopt the desired engine when it runs; start it when it does not."""
        name = self.state.desired_model
        if name is None or name not in self.engines:
            return
        view = self.engines[name]
        if view.unit.running:
            event(
                log,
                "engine_adopted",
                "adopted running engine %s (pid %d, %s/%s)",
                name,
                view.unit.main_pid,
                view.unit.active_state,
                view.unit.sub_state,
                SPARKD_MODEL=name,
            )
            return
        unit = view.model.unit_name

        def start(m: SystemdManager) -> str:
            if view.unit.active_state == "failed":
                m.reset_failed_unit(unit)
            return m.start_unit(unit)

        job = await self.deps.systemd(start)
        event(log, "engine_starting", "starting engine %s (%s)", name, job, SPARKD_MODEL=name)
        await self.refresh_units([name])

    # -- events from systemd --------------------------------------------------------------

    def on_systemd_event(self, ev: SystemdEvent) -> None:
        model = _model_of_unit(ev.unit)
        if model is None or model not in self.engines:
            return
        if isinstance(ev, JobDone):
            level = logging.INFO if ev.result == "done" else logging.WARNING
            event(
                log,
                "engine_job",
                "%s: job %d %s",
                ev.unit,
                ev.job_id,
                ev.result,
                level=level,
                SPARKD_MODEL=model,
            )
        self._schedule_refresh(model)

    def _schedule_refresh(self, model: str) -> None:
        self._refresh_pending.add(model)
        if self._refresh_task is None or self._refresh_task.done():
            self._refresh_task = asyncio.create_task(self._drain_refreshes())

    async def _drain_refreshes(self) -> None:
        while self._refresh_pending:
            names = sorted(self._refresh_pending)
            self._refresh_pending.clear()
            try:
                await self.refresh_units(names)
            except SparkdError as exc:
                log.warning("refreshing %s failed: %s", ", ".join(names), exc)

    async def refresh_units(self, names: list[str]) -> None:
        units = [self.engines[n].model.unit_name for n in names if n in self.engines]

        def read(m: SystemdManager) -> list[UnitStatus]:
            return [m.unit_status(u) for u in units]

        for status in await self.deps.systemd(read):
            model = _model_of_unit(status.name)
            if model in self.engines:
                view = self.engines[model]
                if view.unit.running and not status.running:
                    view.health = None
                view.unit = status
        self.update_status()

    # -- health ---------------------------------------------------------------------------

    async def check_health(self) -> None:
        for view in list(self.engines.values()):
            if not view.unit.running:
                continue
            result = await self.deps.probe(f"http://127.0.0.1:{view.model.port}/health")
            view.health = result
            view.health_failures = 0 if result.ok else view.health_failures + 1
        self.update_status()

    # -- config reload --------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        path = self.config.source
        try:
            new = load_config(path)
            # Rendering checks what parsing cannot (binaries systemd would refuse, ...).
            render_units(new, systemd_version=self.systemd_version)
        except ConfigError as exc:
            self.last_reload = _Reload(ok=False, message=exc.message, at=self.deps.wall_clock())
            event(
                log,
                "config_rejected",
                "new config rejected, keeping the previous one: %s",
                exc.message,
                level=logging.ERROR,
            )
            self.update_status()
            raise
        self.config = new
        await self.apply_config()
        if self.state.desired_model not in new.models:
            self.state = self.state.replace(desired_model=new.daemon.default_model)
            self._save_state()
        await self.converge()
        self.last_reload = _Reload(ok=True, message="reloaded", at=self.deps.wall_clock())
        event(log, "config_reloaded", "config %s reloaded", path)
        self.update_status()
        return {"config": str(path), "models": sorted(new.models)}

    # -- shutdown -------------------------------------------------------------------------

    async def shutdown(self) -> None:
        self.daemon_state = DaemonState.STOPPING
        self.update_status()
        self.deps.notifier.notify("STOPPING=1")
        if self.config.daemon.stop_engines_on_exit:
            units = [v.model.unit_name for v in self.engines.values() if v.unit.running]

            def stop(m: SystemdManager) -> None:
                for u in units:
                    m.stop_unit(u)

            await self.deps.systemd(stop)
            event(log, "engines_stopped", "stopped %s on exit", ", ".join(units) or "nothing")
        self.state = self.state.replace(clean_shutdown=True)
        self._save_state()

    # -- status ---------------------------------------------------------------------------

    def active_model(self) -> str | None:
        desired = self.state.desired_model
        if desired in self.engines and self.engines[desired].unit.active_state == "active":
            return desired
        for name, view in sorted(self.engines.items()):
            if view.unit.active_state == "active":
                return name
        return None

    def status_line(self) -> str:
        if self.daemon_state is not DaemonState.RUNNING:
            return self.daemon_state.value
        desired = self.state.desired_model
        if desired is None:
            line = "no model configured to run"
        elif desired not in self.engines:
            line = f"{desired}: not a supervised model"
        else:
            view = self.engines[desired]
            u = view.unit
            if u.active_state == "active":
                health = "healthy" if view.health and view.health.ok else "health unknown"
                if view.health and not view.health.ok:
                    health = f"unhealthy ({view.health_failures} failed checks)"
                line = f"{desired}: serving, {health}"
            else:
                line = f"{desired}: {u.active_state} ({u.sub_state})"
        if self.last_reload and not self.last_reload.ok:
            line += " · config reload failed, previous config kept"
        return line

    def update_status(self) -> None:
        line = self.status_line()
        if line != self._status_line:
            self._status_line = line
            self.deps.notifier.notify(f"STATUS={line}")
        digest = self._routing_digest()
        if digest != self._published_digest:
            self._published_digest = digest
            self.publish("changed")

    def _routing_digest(self) -> tuple[Any, ...]:
        """What subscribers (the gateway) route on: publish when any of it changes."""
        return (
            self.daemon_state,
            self.state.desired_model,
            tuple(
                (n, v.unit.active_state, v.unit.main_pid, v.health is not None and v.health.ok)
                for n, v in sorted(self.engines.items())
            ),
        )

    # -- subscriptions --------------------------------------------------------------------

    def publish(self, name: str, **fields: Any) -> None:
        """Send an event, with the full status, to every subscriber. A subscriber that does
        not keep up is dropped (its stream ends) rather than holding the daemon's memory."""
        if not self._subscribers:
            return
        message = {"event": name, **fields, "status": self.status()}
        for queue in list(self._subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self._subscribers.discard(queue)

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        """The event stream of one subscriber: a snapshot first, then each event."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
        self._subscribers.add(queue)
        try:
            yield {"event": "snapshot", "status": self.status()}
            while queue in self._subscribers or not queue.empty():
                try:
                    yield await asyncio.wait_for(queue.get(), SUBSCRIBER_KEEPALIVE_S)
                except TimeoutError:
                    if queue not in self._subscribers:
                        return
                    yield {"event": "keepalive"}
        finally:
            self._subscribers.discard(queue)

    def status(self) -> dict[str, Any]:
        try:
            mem = self.deps.meminfo()
            memory: dict[str, Any] = {
                "total_bytes": mem.total,
                "available_bytes": mem.available,
                "page_cache_bytes": mem.page_cache,
            }
        except (OSError, ValueError) as exc:  # ValueError: MemInfoError
            memory = {"error": str(exc)}
        return {
            "schema": 1,
            "daemon": {
                "state": self.daemon_state.value,
                "status_line": self.status_line(),
                "pid": os.getpid(),
                "version": __version__,
                "uptime_s": round(self.deps.clock() - self.started_at, 3),
                "started_at": self.started_wall,
                "config": str(self.config.source),
                "systemd_version": self.systemd_version,
                "state_warning": self.state_warning,
                "last_reload": None
                if self.last_reload is None
                else {"ok": self.last_reload.ok, "message": self.last_reload.message,
                      "at": self.last_reload.at},
            },
            "desired_model": self.state.desired_model,
            "active_model": self.active_model(),
            "last_good_model": self.state.last_good_model,
            "engines": [_engine_json(v) for _, v in sorted(self.engines.items())],
            "memory": memory,
        }

    async def handle(self, request: Request) -> Any:
        if request.method == "status":
            return self.status()
        if request.method == "ping":
            return {"pong": True}
        if request.method == "reload":
            return await self.reload()
        raise BadRequest(
            f"unknown method {request.method!r} (known: status, ping, reload, subscribe)"
        )

    def _save_state(self) -> None:
        try:
            self.deps.store.save(self.state)
        except StateError as exc:
            event(log, "state_write_failed", "%s", exc.message, level=logging.ERROR)


def _model_of_unit(unit: str) -> str | None:
    prefix, suffix = "sparkd-engine@", ".service"
    if unit.startswith(prefix) and unit.endswith(suffix):
        return unit[len(prefix) : -len(suffix)]
    return None


def _describe(result: Mapping[str, Any]) -> str:
    parts = []
    for key in ("written", "removed"):
        items = result.get(key) or []
        if items:
            parts.append(f"{key} {', '.join(items)}")
    return "; ".join(parts) or "no change"


def _engine_json(view: EngineView) -> dict[str, Any]:
    u, h = view.unit, view.health
    return {
        "model": view.model.name,
        "engine": view.model.engine,
        "unit": view.model.unit_name,
        "port": view.model.port,
        "load_state": u.load_state,
        "active_state": u.active_state,
        "sub_state": u.sub_state,
        "main_pid": u.main_pid,
        "n_restarts": u.n_restarts,
        "result": u.result,
        "health": None
        if h is None
        else {
            "ok": h.ok,
            "status": h.status,
            "error": h.error,
            "latency_ms": round(h.latency_ms, 2),
        },
        "health_failures": view.health_failures,
    }


def read_boot_id(path: Path = Path("/proc/sys/kernel/random/boot_id")) -> str:
    return path.read_text().strip()
