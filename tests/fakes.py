"""Fakes for the Supervisor's outside world: a systemd whose jobs end with JobDone signals,
a notifier that records, and a builder that wires them (unit tests only)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from sparkd.accepted import save_accepted
from sparkd.config import Config, ModelConfig, parse_config
from sparkd.daemon.supervisor import Deps, Supervisor
from sparkd.engine.probe import ProbeResult
from sparkd.monitor.memory import MemInfo
from sparkd.state import StateStore
from sparkd.store.plan import VerifyReport
from sparkd.store.preflight import preflight_verify_async
from sparkd.systemd.manager import JobDone, ResourceWeights, SystemdManager, UnitStatus

T = TypeVar("T")
GIB = 1 << 30


class FakeSystemd:
    """Units change state when started or stopped; every job ends with a JobDone signal
    delivered on the event loop, as the real signal bus would."""

    def __init__(self, *, fail_start: set[str] | None = None) -> None:
        self.fail_start = fail_start or set()
        self.units: dict[str, UnitStatus] = {}
        self.calls: list[tuple[str, str]] = []
        self.reloads = 0
        self.supervisor: Supervisor | None = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._jobs = itertools.count(100)
        # unit -> its weights (the desktop ladder); by default sparkd.slice's as shipped
        # (units/sparkd.slice: 50, 50), none set on any other unit (engine units set none)
        self.weights: dict[str, ResourceWeights] = {}

    def set(self, model: str, active: str, sub: str, pid: int = 0, restarts: int = 0,
            result: str = "success") -> None:
        name = f"sparkd-engine@{model}.service"
        self.units[name] = UnitStatus(name, "loaded", active, sub, pid, restarts, result)

    def _job(self, name: str, result: str) -> str:
        job_id = next(self._jobs)
        if self.loop is not None and self.supervisor is not None:
            self.loop.call_soon(self.supervisor.on_systemd_event, JobDone(job_id, name, result))
        return f"/org/freedesktop/systemd1/job/{job_id}"

    def version(self) -> int:
        return 252

    def daemon_reload(self) -> None:
        self.reloads += 1

    def start_unit(self, name: str) -> str:
        self.calls.append(("start", name))
        model = name.split("@", 1)[1].removesuffix(".service")
        if model in self.fail_start:
            self.units[name] = UnitStatus(name, "loaded", "failed", "failed", 0, 0, "exit-code", 1)
            return self._job(name, "failed")
        self.units[name] = UnitStatus(name, "loaded", "active", "running", 77)
        return self._job(name, "done")

    def stop_unit(self, name: str) -> str:
        self.calls.append(("stop", name))
        self.units[name] = UnitStatus(name, "loaded", "inactive", "dead")
        return self._job(name, "done")

    def restart_unit(self, name: str) -> str:
        self.calls.append(("restart", name))
        return self._job(name, "done")

    def reset_failed_unit(self, name: str) -> None:
        self.calls.append(("reset-failed", name))

    def unit_status(self, name: str) -> UnitStatus:
        return self.units.get(name, UnitStatus(name, "loaded"))

    def resource_weights(self, name: str) -> ResourceWeights:
        shipped = (ResourceWeights(cpu_weight=50, io_weight=50) if name.endswith(".slice")
                   else ResourceWeights())
        return self.weights.get(name, shipped)

    def set_resource_weights(self, name: str, weights: ResourceWeights) -> None:
        self.calls.append(("set_resource_weights", name))
        self.weights[name] = weights

    def session_types(self) -> list[str] | None:
        return None  # no logind


@dataclass
class Notes:
    sent: list[str] = field(default_factory=list)

    def notify(self, state: str) -> None:
        self.sent.append(state)


@dataclass
class World:
    sup: Supervisor
    systemd: FakeSystemd
    notes: Notes
    applied: list[tuple[Config, int]]


def build(
    tmp_path: Path,
    config_text: str,
    *,
    systemd: FakeSystemd | None = None,
    probe_status: int = 200,
    journal: Callable[[str], list[str]] = lambda unit: [],
) -> World:
    """A Supervisor over fakes. `config_text` may use {state} for the state directory."""
    cfg_path = tmp_path / "sparkd.toml"
    cfg_path.write_text(config_text.format(state=tmp_path / "state"))
    config = parse_config(cfg_path.read_text(), source=cfg_path)
    fake = systemd or FakeSystemd()
    applied: list[tuple[Config, int]] = []

    def apply_units(c: Config, version: int, reload: Callable[[], None]) -> Mapping[str, Any]:
        applied.append((c, version))
        reload()
        return {"changed": True, "written": [m.unit_name for m in c.supervised_models]}

    async def call(fn: Callable[[SystemdManager], T]) -> T:
        fake.loop = asyncio.get_running_loop()
        return fn(fake)

    async def probe(url: str) -> ProbeResult:
        return ProbeResult(url=url, status=probe_status, error=None, latency_s=0.001)

    async def journal_since(unit: str, since: float) -> list[str]:
        return journal(unit)

    async def models_listed(url: str, model: str) -> bool:
        return True

    async def verify_files(config: Config, model: ModelConfig) -> VerifyReport:
        # The real preflight, on the test's own paths (a model without a manifest has
        # nothing to verify): a test that wants it to fail replaces it.
        return await preflight_verify_async(config, model)

    notes = Notes()
    deps = Deps(
        systemd=call,
        apply_units=apply_units,
        store=StateStore(tmp_path / "state"),
        notifier=notes,
        probe=probe,
        meminfo=lambda: MemInfo(total=16 * GIB, free=GIB, available=12 * GIB, cached=GIB),
        boot_id="boot-2",
        journal_since=journal_since,
        models_listed=models_listed,
        path_exists=Path.exists,
        read_pressure=dict,  # no PSI readings unless a test sets them
        verify_files=verify_files,
        clock=time.monotonic,
        wall_clock=time.time,
        accept_config=save_accepted,  # the real one: the state directory is the test's
    )
    sup = Supervisor(config, deps)
    fake.supervisor = sup
    return World(sup, fake, notes, applied)


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


async def started(sup: Supervisor) -> Supervisor:
    """Start, and wait for what the start set going (the first engine's start swap)."""
    await sup.start()
    await sup.quiesce()
    return sup
