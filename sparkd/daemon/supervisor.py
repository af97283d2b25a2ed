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
import dataclasses
import enum
import logging
import os
from collections.abc import AsyncGenerator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from sparkd import __version__
from sparkd.config import Config, ModelConfig
from sparkd.control.protocol import Request
from sparkd.control.status import (
    DaemonRecord,
    Event,
    EventName,
    ReloadRecord,
    Status,
    SwapRecord,
)
from sparkd.daemon import health, reloading, report, speculative, start_stale
from sparkd.daemon.control import answer
from sparkd.daemon.devices import BlockPresent, DeviceWatch, ReadMounts
from sparkd.daemon.engines import EngineView, engine_key, model_of_unit
from sparkd.daemon.events import EventStream
from sparkd.daemon.jobs import JobTracker
from sparkd.daemon.watch import EngineMemoryOf, MachineWatch, ReadAvailable, Scrape
from sparkd.engine.fingerprints import Match
from sparkd.engine.plan import Snapshot, SwapPlan, SwapStep, plan_swap
from sparkd.engine.probe import ProbeResult
from sparkd.engine.swap import StepFailed, SwapRun, execute
from sparkd.engine.unit import STOP_WAIT_S
from sparkd.engine.versions import detect_version
from sparkd.errors import ConfigError, SparkdError, StateError, SwapInProgress, SwapRefused
from sparkd.journal import event
from sparkd.monitor.memory import MemInfo, MemInfoError
from sparkd.monitor.nvml import NvmlSnapshot
from sparkd.monitor.psi import Pressure
from sparkd.state import State, StateStore
from sparkd.store.plan import VerifyReport
from sparkd.systemd.manager import JobDone, SystemdEvent, SystemdManager, UnitStatus

log = logging.getLogger(__name__)

T = TypeVar("T")


SystemdCall = Callable[[Callable[[SystemdManager], T]], Awaitable[T]]
Probe = Callable[[str], Awaitable[ProbeResult]]
JournalSince = Callable[[str, float], Awaitable[list[str]]]
ModelsListed = Callable[[str, str], Awaitable[bool]]
GIB = 1 << 30
ApplyUnits = Callable[[Config, int, Callable[[], None]], Mapping[str, Any]]


class DaemonState(enum.StrEnum):
    STARTING = "starting"
    RUNNING = "running"
    STOPPING = "stopping"


class Notifier(Protocol):
    def notify(self, state: str) -> None: ...


VerifyFiles = Callable[[Config, ModelConfig], Awaitable[VerifyReport]]


@dataclass(slots=True, kw_only=True)
class Deps:
    """Everything the Supervisor touches outside itself, passed in by the composition root
    (sparkd.daemon.application). No default reaches the machine: a test wires every adapter
    it uses, so none reads the host's /proc or disk behind its back."""

    systemd: SystemdCall[Any]
    apply_units: ApplyUnits
    store: StateStore
    notifier: Notifier
    probe: Probe
    meminfo: Callable[[], MemInfo]
    boot_id: str
    journal_since: JournalSince
    models_listed: ModelsListed
    accept_config: Callable[[Config], object]  # keep as the accepted config (sparkd.accepted)
    path_exists: Callable[[Path], bool]
    read_pressure: Callable[[], Mapping[str, Pressure]]
    verify_files: VerifyFiles
    clock: Callable[[], float]
    wall_clock: Callable[[], float]
    read_gpu: Callable[[], Awaitable[NvmlSnapshot]] | None = None  # None: no GPU readings
    # The watch (sparkd.daemon.watch); None: that part is off.
    read_available: ReadAvailable | None = None  # MemAvailable, for the memory floor
    engine_memory: EngineMemoryOf | None = None  # main pid -> its cgroup's memory.current
    scrape_metrics: Scrape | None = None  # an engine's /metrics text, for liveness
    read_mounts: ReadMounts | None = None  # /proc/self/mountinfo, for the model volumes
    block_present: BlockPresent | None = None  # "MAJ:MIN" -> the block device is there


class Supervisor:
    def __init__(self, config: Config, deps: Deps, *, config_file: Path | None = None,
                 config_refused: str | None = None) -> None:
        self.config = config
        self.deps = deps
        # The administrator's file, which reloads read; `config` may be the accepted copy
        # when that file was refused at start (`config_refused` says why).
        self.config_file = config_file or config.source
        self.config_refused = config_refused
        # Durable writes that failed, until one succeeds: shown in status and doctor.
        self.state_unsaved: str | None = None
        self.config_unsaved: str | None = None
        # This boot followed a power cut or a crash: files are checked, and repaired from
        # their source where they have one, before the first start (verify_files).
        self.unclean_boot = False
        self.state = State()
        self.daemon_state = DaemonState.STARTING
        self.engines: dict[str, EngineView] = {}
        self.systemd_version = 0
        self.started_at = deps.clock()
        self.started_wall = deps.wall_clock()
        self.state_warning: str | None = None
        self.last_reload: ReloadRecord | None = None
        self._refresh_pending: set[str] = set()
        self._refresh_task: asyncio.Task[None] | None = None
        self._status_line = ""
        self._published_digest: tuple[Any, ...] = ()
        self.events = EventStream(self.status)
        self.swap_run: SwapRun | None = None
        self.last_swap: SwapRun | None = None
        self._swap_task: asyncio.Task[SwapRun] | None = None
        self.jobs = JobTracker()
        self._background: set[asyncio.Task[Any]] = set()
        self.watch = MachineWatch(read_gpu=deps.read_gpu, read_pressure=deps.read_pressure,
                                  read_available=deps.read_available,
                                  engine_memory=deps.engine_memory, scrape=deps.scrape_metrics)
        self.devices = DeviceWatch(read_mounts=deps.read_mounts,
                                   block_present=deps.block_present)

    # -- start-up -------------------------------------------------------------------------

    async def start(self) -> None:
        state, warning = self.deps.store.load()
        self.state_warning = warning
        if warning:
            event(log, "state_set_aside", "%s", warning, level=logging.ERROR)
        if self.config_refused:
            event(log, "config_refused", "%s is refused; running on the last accepted config "
                  "(%s): %s", self.config_file, self.config.source, self.config_refused,
                  level=logging.ERROR)
        else:  # engines the file no longer describes go before its copy replaces the old
            await start_stale.stop_stale_at_start(self)
            self.accept_config(self.config)
        previous_boot, clean = state.boot_id, state.clean_shutdown
        if previous_boot and previous_boot != self.deps.boot_id and not clean:
            self.unclean_boot = True
            event(log, "unclean_shutdown", "the previous boot %s ended without a clean sparkd "
                  "stop", previous_boot, level=logging.WARNING)
        self.state = state.replace(boot_id=self.deps.boot_id, clean_shutdown=False)
        self.systemd_version = await self.deps.systemd(lambda m: m.version())
        await self.watch.sample(self.config.daemon, self.active_model)
        await self.apply_config()
        self._choose_desired()
        await self.converge()
        self.save_state()
        self.daemon_state = DaemonState.RUNNING
        self.update_status()
        self.deps.notifier.notify("READY=1")

    def _choose_desired(self) -> None:
        """The model to serve when the state names none that is configured: with no usable
        state (none, empty, corrupt), the engine that already runs, adopted as it is (a
        healthy engine is never stopped for lost bookkeeping); else the default model."""
        desired = self.state.desired_model
        if desired in self.config.models:
            return
        if desired is not None:
            log.warning("desired model %r is no longer configured; using the default %r",
                        desired, self.config.daemon.default_model)
        running = sorted(
            (v.unit.active_state != "active", key) for key, v in self.engines.items()
            if v.variant == "plain" and v.unit.running)
        if desired is None and running:
            adopted = running[0][1]
            view = self.engines[adopted]
            event(log, "state_adopted", "no usable state: adopted %s, which runs (pid %d, %s), "
                  "as the desired model", adopted, view.unit.main_pid, view.unit.active_state,
                  level=logging.WARNING, SPARKD_MODEL=adopted)
            self.state = self.state.replace(desired_model=adopted)
            return
        self.state = self.state.replace(desired_model=self.config.daemon.default_model)

    def accept_config(self, config: Config) -> None:
        """Keep `config` as the accepted config (what engines' prestart reads); a failure is
        a condition shown until a later write succeeds."""
        try:
            self.deps.accept_config(config)
        except ConfigError as exc:
            if self.config_unsaved != exc.message:
                event(log, "config_copy_failed", "%s", exc.message, level=logging.ERROR)
            self.config_unsaved = exc.message
            return
        self.config_unsaved = None

    async def apply_config(self) -> None:
        """Render and reconcile the engine units for the current config."""
        config, version = self.config, self.systemd_version

        def apply(m: SystemdManager) -> Mapping[str, Any]:
            return self.deps.apply_units(config, version, m.daemon_reload)

        result = await self.deps.systemd(apply)
        if result.get("changed"):
            event(log, "units_reconciled", "engine units reconciled: %s",
                  report.describe_units(result))
        self.engines = {
            engine_key(m.name, v): self.engines.get(engine_key(m.name, v))
            or EngineView(model=m, unit=UnitStatus(m.unit_for(v)), variant=v,
                          engine_version=detect_version(m))  # cached since apply_units
            for m in config.supervised_models
            for v in m.variants
        }
        for view in self.engines.values():
            view.model = config.models[view.model.name]
        await self.refresh_units(list(self.engines))

    async def converge(self) -> None:
        """Resume a swap that a previous sparkd left in flight; otherwise adopt the desired
        engine when it runs and start it when it does not."""
        if self.state.swap_to is not None:
            target = self.state.swap_to
            event(log, "swap_resumed", "resuming the swap to %s (left at step %s)", target,
                  self.state.swap_step or "?", SPARKD_MODEL=target)
            self.state = self.state.replace(
                desired_model=self.state.swap_from or self.state.desired_model
            )
            try:
                self.request_swap(target, reason="resumed after a sparkd restart")
                return
            except SparkdError as exc:
                event(log, "swap_failed", "cannot resume the swap to %s: %s", target,
                      exc.message, level=logging.ERROR, SPARKD_MODEL=target)
                self.state = self.state.replace(swap_to=None, swap_from=None, swap_step=None,
                                                last_failure_model=target,
                                                last_failure_reason=exc.message)
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
            # An active one is probed now, so that the first status (READY, the gateway's
            # routing view) says whether it serves, not "health unknown" until the first
            # health check (the gateway held requests for an engine that served all along).
            if view.unit.active_state == "active":
                view.health = await self.deps.probe(view.health_url)
            self.spawn(self.start_speculative(name))
            return
        # Started as a swap from nothing: the same health gate, and a rollback to the last
        # good model when the desired one does not come up (after a power cut, say).
        event(log, "engine_starting", "starting engine %s", name, SPARKD_MODEL=name)
        try:
            self.request_swap(name, reason="start the desired model")
        except SparkdError as exc:
            event(log, "engine_start_refused", "cannot start %s: %s", name, exc.message,
                  level=logging.ERROR, SPARKD_MODEL=name)
            self.state = self.state.replace(last_failure_model=name,
                                            last_failure_reason=exc.message)

    # -- events from systemd --------------------------------------------------------------

    def on_systemd_event(self, ev: SystemdEvent) -> None:
        if isinstance(ev, JobDone):  # any engine unit's: the start stops units of no engine
            self.jobs.finished(ev.job_id, ev.result)
        model = model_of_unit(ev.unit)
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
        if self.daemon_state is DaemonState.STOPPING:
            return
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
        units = [self.engines[n].unit_name for n in names if n in self.engines]

        def read(m: SystemdManager) -> list[UnitStatus]:
            return [m.unit_status(u) for u in units]

        for status in await self.deps.systemd(read):
            model = model_of_unit(status.name)
            if model in self.engines:
                view = self.engines[model]
                before = view.unit
                if before.running and not status.running:
                    view.health = None
                    view.healthy_since = None
                view.unit = status
                self._observe_unit(model, before, status)
        self.update_status()

    def _observe_unit(self, model: str, before: UnitStatus, now: UnitStatus) -> None:
        if now.n_restarts > before.n_restarts and before.load_state == "loaded":
            # Result= after the restart is the new run's; why the old one ended is in `before`.
            why = next((r for r in (before.result, now.result) if r and r != "success"), None)
            event(log, "engine_restarted", "systemd restarted %s (restart %d%s)", model,
                  now.n_restarts, f"; the run before ended: {why}" if why else "",
                  level=logging.WARNING, SPARKD_MODEL=model)
        # Engine units restart on failure, so a failed one is one systemd gave up on: its
        # start limit was hit (systemd 252 reports the auto-restart's Result, e.g. exit-code;
        # later versions say start-limit-hit) or it failed in a way not worth restarting.
        if (
            now.active_state == "failed"
            and before.active_state != "failed"
            and before.load_state == "loaded"  # a change seen, not the first reading
            and self.swap_run is None
            and model == self.state.desired_model
        ):
            self.spawn(self._crash_loop(model, now))

    async def _crash_loop(self, model: str, status: UnitStatus) -> None:
        await health.crash_loop(self, model, status)

    async def quiesce(self) -> None:
        """Wait for the work events have started (refreshes, swaps, crash-loop handling)."""
        await asyncio.sleep(0)  # let call_soon'd signal handlers run
        while True:
            pending = [t for t in (self._refresh_task, self._swap_task, *self._background)
                       if t is not None and not t.done()]
            if not pending:
                return
            await asyncio.wait(pending)
            await asyncio.sleep(0)

    def spawn(self, coro: Awaitable[Any]) -> None:
        task: asyncio.Task[Any] = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # -- health ---------------------------------------------------------------------------

    async def check_health(self) -> None:
        await health.check_health(self)

    # -- swaps (the SwapContext the executor runs against) -------------------------------

    def snapshot(self) -> Snapshot:
        mem = self.deps.meminfo()
        return Snapshot(
            mem_total=mem.total,
            mem_available=mem.available,
            units={n: v.unit for n, v in self.engines.items()},
            path_exists={n: self.deps.path_exists(m.path) for n, m in self.config.models.items()},
        )

    def plan(self, target: str) -> SwapPlan:
        return plan_swap(self.config, self.state, target, self.snapshot())

    def request_swap(self, target: str, *, reason: str = "requested") -> SwapRun | None:
        """Start a swap to `target` in the background; None when it already serves.
        Raises SwapInProgress, UnknownModel or SwapRefused (nothing changed)."""
        if self.swap_run is not None:
            run = self.swap_run
            raise SwapInProgress(
                f"swap {run.id} ({run.plan.from_model or 'nothing'} -> {run.plan.target}) is "
                f"in progress, at step {run.step.value}; try again when it has finished"
            )
        if (paused := self.devices.swaps_paused()) is not None:
            raise SwapRefused(paused)
        plan = self.plan(target)
        if plan.noop:
            if self.state.swap_to is not None:
                self.state = self.state.replace(swap_to=None, swap_from=None, swap_step=None)
                self.save_state()
            return None
        # Numbered after the last swap the state knows: unique across sparkd restarts.
        run = SwapRun(plan=plan, reason=reason, id=self.state.last_swap_id + 1)
        self.state = self.state.replace(last_swap_id=run.id)
        self.swap_run = run
        self._swap_task = asyncio.create_task(execute(run, self))
        return run

    async def systemd(self, fn: Callable[[SystemdManager], T]) -> T:
        result: T = await self.deps.systemd(fn)
        return result

    async def wait_job(self, job: str, timeout_s: float) -> str:
        return await self.jobs.wait(job, timeout_s)

    async def probe(self, url: str) -> ProbeResult:
        """A probe for the swap executor; a health answer also counts as the engine's check."""
        result = await self.deps.probe(url)
        for view in self.engines.values():
            if url == view.health_url:
                view.health = result
                if result.ok:
                    view.health_failures = 0
                    view.healthy_since = view.healthy_since or self.deps.clock()
        return result

    async def models_listed(self, url: str, model: str) -> bool:
        return await self.deps.models_listed(url, model)

    async def journal_since(self, unit: str, since: float) -> list[str]:
        return await self.deps.journal_since(unit, since)

    async def verify_files(self, model: str) -> str:
        """The store's preflight (incremental SHA-256 against the manifest; repair when the
        model says so), in a worker thread. Raises VerificationFailed naming the file."""
        m = self.config.models[model]
        repairing = self.unclean_boot and m.source is not None and not m.repair
        if repairing:
            m = dataclasses.replace(m, repair=True)
        began = self.deps.clock()
        try:
            report = await self.deps.verify_files(self.config, m)
        finally:
            if self.unclean_boot:
                took = self.deps.clock() - began
                event(log, "boot_verify", "after the unclean shutdown: %s's files checked%s "
                      "in %.1f s", model, " (and repaired from its source where bad)"
                      if repairing else "", took, SPARKD_MODEL=model,
                      SPARKD_DURATION_MS=f"{took * 1000:.0f}")
        if report.note:
            return report.note
        return f"{len(report.verdicts)} files verified"

    def swap_progress(self, run: SwapRun) -> None:
        self.state = self.state.replace(
            swap_to=run.plan.target, swap_from=run.plan.from_model, swap_step=run.step.value
        )
        self.save_state()
        self.publish("swap_step", swap=report.swap_record(run))
        self.update_status()

    def swap_flip(self, run: SwapRun) -> None:
        """The target becomes the desired model, on disk first: a flip that cannot be made
        durable fails (the swap rolls back), so no restart or power cut swaps back."""
        before = self.state
        self.state = self.state.replace(desired_model=run.plan.target)
        if not self.save_state():
            self.state = before
            raise StepFailed(f"nothing flipped: the state could not be saved: "
                             f"{self.state_unsaved}")

    def swap_finished(self, run: SwapRun) -> None:
        changes: dict[str, Any] = {"swap_to": None, "swap_from": None, "swap_step": None}
        if not run.succeeded:  # refused (nothing changed), rolled back, or worse
            changes.update(last_failure_model=run.plan.target, last_failure_reason=run.failure)
            if run.step is SwapStep.ROLLED_BACK:
                changes["desired_model"] = run.plan.rollback_to
        self.state = self.state.replace(**changes)
        self.save_state()
        self.swap_run, self.last_swap = None, run
        self.watch.actions.swap_ended(run.step.value)
        self.publish("swap_done" if run.succeeded else "swap_failed",
                     swap=report.swap_record(run))
        self.update_status()
        serving = (run.plan.target if run.succeeded else run.plan.from_model
                   if run.step is SwapStep.REFUSED else run.plan.rollback_to)
        if serving is not None:
            self.spawn(self.start_speculative(serving))
        elif self._refused_from_nothing(run):
            self._fall_back(run)

    def _refused_from_nothing(self, run: SwapRun) -> bool:
        """A start of the desired model, with nothing serving, refused at its preflight (its
        files are damaged, say, after a power cut): something else must serve."""
        back = run.plan.rollback_to
        return (run.step is SwapStep.REFUSED and run.plan.from_model is None
                and back is not None and back != run.plan.target and back in self.engines)

    def _fall_back(self, run: SwapRun) -> None:
        back = run.plan.rollback_to
        assert back is not None
        event(log, "fallback", "%s was refused (%s); falling back to the last good model %s",
              run.plan.target, run.failure, back, level=logging.ERROR,
              SPARKD_MODEL=run.plan.target)
        self.state = self.state.replace(desired_model=back)
        self.save_state()
        try:
            self.request_swap(back, reason=f"fallback: {run.plan.target} was refused")
        except SparkdError as exc:
            log.error("the fallback to %s failed: %s", back, exc.message)

    async def start_speculative(self, name: str) -> None:
        await speculative.start_speculative(self, name)

    def fingerprints_found(self, model: str, matches: list[Match]) -> None:
        if model in self.engines:
            self.engines[model].fingerprints = matches
        for m in matches:
            level = {"info": logging.INFO, "warning": logging.WARNING}.get(
                m.fingerprint.severity, logging.ERROR
            )
            event(log, "fingerprint", "%s: %s (%s): %s", model, m.fingerprint.id,
                  m.fingerprint.meaning, m.line, level=level, SPARKD_MODEL=model,
                  SPARKD_FINGERPRINT=m.fingerprint.id, SPARKD_VALUE=m.value or "")

    async def unload(self, name: str) -> dict[str, Any]:
        """Stop a model's engine (idle unload): it stays configured, it is no longer desired."""
        model = self.config.model(name)
        if self.swap_run is not None:
            raise SwapInProgress(f"swap {self.swap_run.id} is in progress; unload after it")
        units = [model.unit_for(v) for v in model.variants]
        jobs = await self.deps.systemd(lambda m: [m.stop_unit(u) for u in units])
        results = [await self.wait_job(job, STOP_WAIT_S) for job in jobs]
        result = "done" if all(r == "done" for r in results) else ", ".join(results)
        if self.state.desired_model == name:
            self.state = self.state.replace(desired_model=None)
            self.save_state()
        event(log, "engine_unloaded", "%s unloaded (stop job %s)", name, result,
              SPARKD_MODEL=name)
        await self.refresh_units([engine_key(name, v) for v in model.variants])
        return {"model": name, "stopped": result == "done"}

    # -- config reload --------------------------------------------------------------------

    async def reload(self) -> dict[str, Any]:
        return await reloading.reload(self)

    # -- shutdown -------------------------------------------------------------------------

    async def shutdown(self) -> None:
        # A swap in flight stays in the state: the next sparkd resumes it.
        await self._cancel_work()
        self.daemon_state = DaemonState.STOPPING
        self.update_status()
        self.deps.notifier.notify("STOPPING=1")
        if self.config.daemon.stop_engines_on_exit:
            units = [v.unit_name for v in self.engines.values() if v.unit.running]

            def stop(m: SystemdManager) -> None:
                for u in units:
                    m.stop_unit(u)

            await self.deps.systemd(stop)
            event(log, "engines_stopped", "stopped %s on exit", ", ".join(units) or "nothing")
        self.state = self.state.replace(clean_shutdown=True)
        self.save_state()
        await self._cancel_work()
        self.events.close()

    async def _cancel_work(self) -> None:
        tasks = [t for t in (self._swap_task, self._refresh_task, *self._background)
                 if t is not None and not t.done()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    # -- status ---------------------------------------------------------------------------

    def active_model(self) -> str | None:
        return report.active_model(self.state.desired_model, self.engines)

    def status_line(self) -> str:
        return report.status_line(self.daemon_state.value, self.state.desired_model,
                                  self.swap_run, self.engines, self.last_reload,
                                  self.conditions())

    def conditions(self) -> list[str]:
        """What is wrong with sparkd itself, said on the STATUS= line."""
        out = []
        if self.config_refused:
            out.append(f"{self.config_file} refused, running on the last accepted config")
        if self.state_unsaved:
            out.append("state not saved")
        if self.config_unsaved:
            out.append("accepted config not saved")
        out += self.devices.conditions()
        return out

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
            None if self.swap_run is None else (self.swap_run.id, self.swap_run.step),
            tuple(
                (n, v.unit.active_state, v.unit.main_pid, v.health is not None and v.health.ok)
                for n, v in sorted(self.engines.items())
            ),
        )

    # -- subscriptions --------------------------------------------------------------------

    def publish(self, name: EventName, *, swap: SwapRecord | None = None) -> None:
        self.events.publish(name, swap=swap)

    def subscribe(self) -> AsyncGenerator[Event, None]:
        return self.events.subscribe()

    def status(self) -> Status:
        try:
            memory = report.memory_record(self.deps.meminfo(), self.watch.gpu)
        except (OSError, MemInfoError) as exc:
            memory = report.memory_record(str(exc), self.watch.gpu)
        daemon = DaemonRecord(
            state=self.daemon_state.value,
            status_line=self.status_line(),
            pid=os.getpid(),
            version=__version__,
            uptime_s=round(self.deps.clock() - self.started_at, 3),
            started_at=self.started_wall,
            config=str(self.config.source),
            systemd_version=self.systemd_version,
            state_warning=self.state_warning,
            last_reload=self.last_reload,
            config_refused=self.config_refused,
            state_unsaved=self.state_unsaved,
            config_unsaved=self.config_unsaved,
            **self.devices.record(),  # degraded, swaps_paused, on_battery
        )
        return report.build_status(
            daemon=daemon, state=self.state, engines=self.engines, swap_run=self.swap_run,
            last_swap=self.last_swap, memory=memory, pressure=self.watch.pressure,
            gpu=self.watch.gpu, machine=self.watch.machine_record(sup=self))

    async def handle(self, request: Request) -> Any:
        return await answer(self, request)

    def save_state(self) -> bool:
        """Write the state; False (and a condition status and doctor show until a write
        succeeds) when it could not be made durable."""
        try:
            self.deps.store.save(self.state)
        except StateError as exc:
            if self.state_unsaved != exc.message:
                event(log, "state_write_failed", "%s", exc.message, level=logging.ERROR)
            self.state_unsaved = exc.message
            self.update_status()
            return False
        if self.state_unsaved is not None:
            self.state_unsaved = None
            event(log, "state_saved", "the state is on disk again (%s)", self.deps.store.path)
            self.update_status()
        return True


def read_boot_id(path: Path = Path("/proc/sys/kernel/random/boot_id")) -> str:
    return path.read_text().strip()
