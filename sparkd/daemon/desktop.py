"""The desktop ladder's adapter (docs/watch.md "The desktop ladder"): on every health tick it
gathers the readings (PSI from the watch, the lateness probe's report, logind's sessions and
the GPU's graphics processes), asks the pure rule (sparkd.monitor.desktop.decide), and acts
through systemd: the engines' slice's weights lowered at runtime (sparkd.slice, a sibling of
user.slice: an engine unit's own weight would only divide that slice among engines), a vLLM
engine restarted with the latency MoE backend where those kernels run, the engine stopped, the
weights restored. Every step is a journal event with the reasons."""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from sparkd.atomic import atomic_write
from sparkd.daemon.health import restart_done
from sparkd.engine.fingerprints import chosen_moe_backend
from sparkd.engine.unit import STOP_WAIT_S
from sparkd.engine.versions import (
    DEFAULT_MOE_BACKEND,
    LATENCY_MOE_MAJOR,
    MOE_BACKEND_ENV,
    MOE_BACKEND_FLAG,
    MOE_FLAG_TO_ENV,
    rules_for,
)
from sparkd.journal import event
from sparkd.monitor import desktop as dk
from sparkd.monitor.lateness import read_report
from sparkd.monitor.nvml import compute_capability
from sparkd.systemd.manager import UNSET, ResourceWeights, SystemdManager
from sparkd.units.render import ENGINE_SLICE

if TYPE_CHECKING:
    from sparkd.config import Config, ModelConfig
    from sparkd.daemon.supervisor import Supervisor
    from sparkd.desktop_config import DesktopConfig

log = logging.getLogger(__name__)

#: The weights before the ladder lowered them, kept across sparkd restarts (the runtime drop-in
#: outlives sparkd, not the boot: a file of another boot is ignored).
SAVED_FILE = "desktop-ladder.json"

#: The MoE backend vLLM's "latency" setting names (sparkd.engine.versions' default pin).
LATENCY_MOE_BACKEND = DEFAULT_MOE_BACKEND


def process_name(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return None


def lowered(saved: ResourceWeights, cfg: DesktopConfig) -> ResourceWeights:
    """The weights of the first step: never raised, MemoryHigh lowered only where set."""
    def low(current: int, target: int) -> int:
        return target if current == UNSET else min(current, target)
    high = saved.memory_high
    return ResourceWeights(
        cpu_weight=low(saved.cpu_weight, cfg.cpu_weight),
        io_weight=low(saved.io_weight, cfg.io_weight),
        memory_high=high if high == UNSET else int(high * cfg.memory_high_factor))


def latency_blocked(kind: str, version: str | None,
                    capability: tuple[int, int] | None) -> str | None:
    """Why a restart with the latency MoE backend would not give the latency kernels (None:
    it would): vLLM runs them only on compute capability 10.x (docs/units.md "The MoE pin");
    elsewhere a release before 0.17 falls back to CUTLASS by itself and a later one refuses
    the start, and an unknown GPU could be either."""
    if kind != "vllm":
        return None
    if capability is None:
        return ("the GPU's compute capability could not be read: a restart with "
                f"{DEFAULT_MOE_BACKEND} could be refused by vLLM")
    if capability[0] != LATENCY_MOE_MAJOR:
        rules = rules_for("vllm", version).rules
        outcome = "refuses that start" if rules.moe_refuses else "falls back to CUTLASS"
        return (f"the latency MoE kernels do not run on this GPU (compute capability "
                f"{capability[0]}.{capability[1]}; vLLM runs them only on "
                f"{LATENCY_MOE_MAJOR}.x): vLLM {version or '(version unknown)'} {outcome}")
    return None


def with_latency_pin(model: ModelConfig, version: str | None) -> ModelConfig:
    """The model with the latency MoE pin as its own, in the form its release reads (the
    flag from 0.17, the variable before): a model's own pin wins over sparkd's, and a flag
    given last wins over an earlier one (argparse), so the engine runs it."""
    if rules_for("vllm", version).rules.moe_pin == "flag":
        return dataclasses.replace(
            model, args=(*model.args, MOE_BACKEND_FLAG, DEFAULT_MOE_BACKEND))
    env = {**model.env_dict, MOE_BACKEND_ENV: MOE_FLAG_TO_ENV[DEFAULT_MOE_BACKEND]}
    return dataclasses.replace(model, env=tuple(sorted(env.items())))


class DesktopWatch:
    def __init__(self, *, name_of: Callable[[int], str | None] = process_name,
                 capability: Callable[[], tuple[int, int] | None] = lambda:
                 compute_capability().value) -> None:
        self.name_of = name_of
        self.capability = capability
        self.state = dk.LadderState()
        self.saved: dict[str, ResourceWeights] = {}  # engine unit -> its weights before
        self.presence: dk.Presence | None = None
        self.lateness_ms: float | None = None
        self.last: dk.Decision | None = None
        self._lateness_error = False
        self._failed = False
        self._loaded = False

    def _lateness(self, sup: Supervisor, cfg: DesktopConfig) -> float | None:
        try:
            report = read_report(cfg.lateness_file, sup.deps.wall_clock())
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            if not self._lateness_error:
                self._lateness_error = True
                event(log, "desktop_lateness_unread", "cannot read the lateness probe's "
                      "report %s: %s", cfg.lateness_file, exc, level=logging.WARNING)
            return None
        self._lateness_error = False
        if report is None or report.age_s > cfg.lateness_stale_s or report.samples == 0:
            return None
        return report.p99_ms

    async def _presence(self, sup: Supervisor, cfg: DesktopConfig) -> dk.Presence:
        if cfg.presence != "detect":
            return dk.desktop_presence(None, None, cfg.presence)
        sessions = await sup.deps.systemd(lambda m: m.session_types())
        gpu = sup.watch.gpu
        names: list[str] | None = None
        if gpu is not None and gpu.gpus:
            names = [n for g in gpu.gpus for n in map(self.name_of, g.graphics_pids) if n]
        return dk.desktop_presence(sessions, names)

    def _engine(self, sup: Supervisor) -> dk.EngineFacts | None:
        name = sup.active_model()
        view = sup.engines.get(name) if name else None
        if view is None or not view.unit.running:
            return None
        return dk.EngineFacts(name=name or "", kind=view.model.engine,
                              moe_backend=chosen_moe_backend(view.fingerprints),
                              latency_blocked=latency_blocked(
                                  view.model.engine, view.release, self.capability()))

    async def tick(self, sup: Supervisor) -> None:
        """One health tick's worth: readings, the rule, the step. A failure is said (once in
        a row) and never stops the health check that called it."""
        try:
            await self._tick(sup)
            self._failed = False
        except Exception as exc:
            if not self._failed:
                self._failed = True
                event(log, "desktop_ladder_failed", "desktop ladder: %s", exc,
                      level=logging.ERROR)

    def _load(self, sup: Supervisor) -> None:
        """The weights an earlier sparkd of this boot lowered and did not restore."""
        self._loaded = True
        path = sup.config.daemon.state_dir / SAVED_FILE
        try:
            raw = json.loads(path.read_text())
            if raw.get("boot_id") != sup.deps.boot_id:
                return
            self.saved = {unit: ResourceWeights(*map(int, values))
                          for unit, values in raw["saved"].items()}
        except FileNotFoundError:
            return
        except (OSError, ValueError, TypeError, KeyError, AttributeError) as exc:
            event(log, "desktop_saved_unread", "desktop ladder: %s is unreadable (%s); "
                  "weights it lowered before this sparkd started stay lowered until the "
                  "next boot", path, exc, level=logging.WARNING)
            return
        if self.saved:
            self.state = dk.LadderState(level=1)  # lowered: the next calm period restores

    def _keep(self, sup: Supervisor) -> None:
        data = {"boot_id": sup.deps.boot_id,
                "saved": {unit: [w.cpu_weight, w.io_weight, w.memory_high]
                          for unit, w in self.saved.items()}}
        atomic_write(sup.config.daemon.state_dir / SAVED_FILE,
                     (json.dumps(data) + "\n").encode())

    async def _tick(self, sup: Supervisor) -> None:
        if not self._loaded:
            self._load(sup)
        cfg = sup.config.daemon.desktop
        if not cfg.ladder:
            if self.saved:
                await self._restore(sup, "the ladder was turned off")
            self.state = dk.LadderState()
            return
        presence = await self._presence(sup, cfg)
        if self.presence is None or presence.present != self.presence.present:
            event(log, "desktop_presence", "desktop %s: %s",
                  "present" if presence.present else "absent", presence.why)
        self.presence = presence
        self.lateness_ms = self._lateness(sup, cfg)
        readings = dk.Readings(t=sup.deps.clock(), pressure=sup.watch.pressure,
                               lateness_p99_ms=self.lateness_ms, desktop=presence.present,
                               engine=self._engine(sup))
        decision = dk.decide(self.state, readings, cfg.limits(),
                             latency_backend=LATENCY_MOE_BACKEND)
        if decision.action is dk.Action.STEP and sup.swap_run is not None:
            return  # no step while a swap runs: the count stays, the step comes after it
        self.state = decision.state
        if decision.action is dk.Action.NONE:
            if decision.reasons or self.last is None:
                self.last = decision
            return
        self.last = decision
        if decision.action is dk.Action.RESTORE:
            await self._restore(sup, decision.why)
            return
        assert decision.step is not None and readings.engine is not None
        for skipped in decision.skipped:
            event(log, "desktop_ladder_skip", "desktop ladder: step %s skipped: %s",
                  skipped.step.value, skipped.why, SPARKD_MODEL=readings.engine.name)
        await self._step(sup, decision.step, readings.engine, decision)

    async def _step(self, sup: Supervisor, step: dk.Step, engine: dk.EngineFacts,
                    decision: dk.Decision) -> None:
        cfg = sup.config.daemon.desktop
        view = sup.engines[engine.name]
        unit = view.unit_name
        weighed = ENGINE_SLICE  # where the weights act against user.slice (units/sparkd.slice)
        reasons = "; ".join(str(r) for r in decision.reasons)
        common: dict[str, object] = {"SPARKD_MODEL": engine.name, "SPARKD_STEP": step.value,
                  "SPARKD_REASONS": reasons}
        if step is dk.Step.WEIGHTS:
            saved = self.saved.get(weighed) or await sup.deps.systemd(
                lambda m: m.resource_weights(weighed))
            low = lowered(saved, cfg)
            self.saved[weighed] = saved
            self._keep(sup)  # before the change: a crash after it still knows what to restore
            await sup.deps.systemd(lambda m: m.set_resource_weights(weighed, low))
            event(log, "desktop_ladder", "desktop ladder: %s (%s); %s: CPUWeight %s -> %s, "
                  "IOWeight %s -> %s%s", reasons, decision.why, weighed, _w(saved.cpu_weight),
                  low.cpu_weight, _w(saved.io_weight), low.io_weight,
                  "" if saved.memory_high == UNSET else
                  f", MemoryHigh {saved.memory_high} -> {low.memory_high}",
                  level=logging.WARNING, common=common)
        elif step is dk.Step.LATENCY_MOE:
            # The rule only gets here where the latency kernels run (EngineFacts'
            # latency_blocked): the unit is rendered again with the latency pin as the model's
            # own and restarted. The pin lasts until sparkd renders the units again (a reload,
            # sparkd's start): restoring the weights does not undo it (one more load).
            event(log, "desktop_ladder", "desktop ladder: %s (%s); %s runs the MoE backend %s, "
                  "not the latency one %s: restarting it with %s", reasons, decision.why,
                  engine.name, engine.moe_backend, LATENCY_MOE_BACKEND, LATENCY_MOE_BACKEND,
                  level=logging.WARNING, common=common)
            config = latency_config(sup.config, view.model.name, view.release)
            await sup.deps.systemd(lambda m: sup.deps.apply_units(
                config, sup.systemd_version, m.daemon_reload))
            sup.watch.actions.record("desktop_latency_moe", engine.name, sup.deps.wall_clock(),
                                     f"restarted with {LATENCY_MOE_BACKEND}: {reasons}")
            job = await sup.deps.systemd(lambda m: m.restart_unit(unit))
            sup.spawn(restart_done(sup, engine.name, job))
        else:
            event(log, "desktop_ladder", "desktop ladder: %s (%s); stopping %s so that the "
                  "desktop stays usable", reasons, decision.why, engine.name,
                  level=logging.ERROR, common=common)
            job = await sup.deps.systemd(lambda m: m.stop_unit(unit))
            why = f"stopped by the desktop ladder: {reasons}"
            sup.watch.actions.record("desktop_stop", engine.name, sup.deps.wall_clock(), why)
            changes: dict[str, object] = {"last_failure_model": view.model.name,
                                          "last_failure_reason": why}
            if sup.state.desired_model == view.model.name:
                changes["desired_model"] = None
            sup.state = sup.state.replace(**changes)
            sup.save_state()
            sup.spawn(self._stopped(sup, engine.name, job))

    async def _stopped(self, sup: Supervisor, name: str, job: str) -> None:
        result = await sup.wait_job(job, STOP_WAIT_S)
        event(log, "desktop_ladder_stopped", "%s stopped by the desktop ladder (job %s)",
              name, result, SPARKD_MODEL=name)
        await sup.refresh_units([name])

    async def _restore(self, sup: Supervisor, why: str) -> None:
        for unit, saved in list(self.saved.items()):
            try:
                await sup.deps.systemd(_setter(unit, saved))
            except Exception as exc:
                event(log, "desktop_restore_failed", "desktop ladder: restoring %s's weights "
                      "failed: %s", unit, exc, level=logging.ERROR)
                continue
            del self.saved[unit]
            self._keep(sup)
            event(log, "desktop_restored", "desktop ladder: %s; %s: CPUWeight %s, IOWeight %s "
                  "restored", why, unit, _w(saved.cpu_weight), _w(saved.io_weight),
                  SPARKD_STEP="restore")


def _setter(unit: str, weights: ResourceWeights) -> Callable[[SystemdManager], None]:
    return lambda m: m.set_resource_weights(unit, weights)


def _w(value: int) -> str:
    return "default" if value == UNSET else str(value)


def latency_config(config: Config, name: str, version: str | None) -> Config:
    """`config` with model `name` pinned to the latency MoE backend (with_latency_pin)."""
    models = dict(config.models)
    models[name] = with_latency_pin(models[name], version)
    return dataclasses.replace(config, models=models)
