"""What sparkd watches on the machine between events, and what it does about it (docs/watch.md):

- the GPU (NVML) and pressure stall information (PSI), read on the health timer; a desktop
  starving for memory is said once per episode (the seed's frozen-desktop disaster);
- the memory floor: MemAvailable read every `memory_floor_interval_s` (one small file, one
  field), the pure rule in sparkd.monitor.floor, and a stop of the engine that grows when it
  trips (`floor_loop`, a task of its own: the health timer is far too slow to beat the kernel);
- liveness beyond /health: each running engine's /metrics scraped on the health timer, one
  window per `liveness_window_s` fed to sparkd.monitor.liveness with the NVML readings, three
  strikes and the restart path health.py has (`liveness`).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from sparkd.config import DaemonConfig
from sparkd.control.status import DesktopStateName, MachineRecord
from sparkd.daemon import health
from sparkd.daemon.actions import WatchActions
from sparkd.daemon.desktop import DesktopWatch
from sparkd.daemon.machine import machine_record
from sparkd.engine.unit import STOP_WAIT_S, engine_url
from sparkd.journal import event
from sparkd.monitor import liveness as lv
from sparkd.monitor.floor import (
    GIB,
    EngineMemory,
    FloorCount,
    FloorRule,
    culprit,
    floor_step,
    next_reading_in,
)
from sparkd.monitor.memory import format_size
from sparkd.monitor.nvml import NvmlSnapshot
from sparkd.monitor.psi import Pressure

if TYPE_CHECKING:
    from sparkd.daemon.supervisor import Supervisor

log = logging.getLogger(__name__)

ReadAvailable = Callable[[], int]  # MemAvailable in bytes (raises OSError or ValueError)
EngineMemoryOf = Callable[[int], int | None]  # main pid -> its cgroup's memory.current
Scrape = Callable[[str], Awaitable[str | None]]  # /metrics URL -> text (None: no answer)


@dataclass(slots=True)
class LiveWindow:
    """One engine's liveness readings since its window began, and its strikes."""

    engine: list[lv.EngineSample] = field(default_factory=list)
    gpu: list[lv.GpuSample] = field(default_factory=list)
    strikes: lv.Strikes = field(default_factory=lv.Strikes)
    last: lv.Verdict | None = None


class MachineWatch:
    def __init__(self, *, read_gpu: Callable[[], Awaitable[NvmlSnapshot]] | None,
                 read_pressure: Callable[[], Mapping[str, Pressure]],
                 read_available: ReadAvailable | None = None,
                 engine_memory: EngineMemoryOf | None = None,
                 scrape: Scrape | None = None) -> None:
        self.read_gpu = read_gpu  # None: no GPU readings
        self.read_pressure = read_pressure
        self.read_available = read_available  # None: no memory floor
        self.engine_memory = engine_memory
        self.scrape = scrape  # None: no liveness beyond /health
        self.gpu: NvmlSnapshot | None = None
        self.pressure: Mapping[str, Pressure] = {}
        self._pressure_warned = False
        self.floor = FloorCount()
        self.baseline: dict[str, tuple[float, int]] = {}  # engine -> (when, memory.current)
        self.stopping: set[str] = set()  # engines the floor is stopping
        self._floor_read_failed = False
        self.live: dict[str, LiveWindow] = {}
        # What the watch did, for status and metrics (sparkd.daemon.actions).
        self.actions = WatchActions()
        self.ladder = DesktopWatch()  # the desktop ladder (sparkd.daemon.desktop)

    @property
    def lateness_p99_ms(self) -> float | None:
        """The lateness probe's p99 as the ladder last read it (None: no fresh report)."""
        return self.ladder.lateness_ms

    @property
    def desktop(self) -> DesktopStateName:
        """The desktop's presence as the ladder last judged it, for status."""
        presence = self.ladder.presence
        if presence is None:
            return "unknown"
        if presence.present:
            return "present"
        return "headless" if presence.known else "unknown"

    async def sample(self, config: DaemonConfig, serving: Callable[[], str | None]) -> None:
        if self.read_gpu is not None:
            self.gpu = await self.read_gpu()
        self.pressure = self.read_pressure()
        self._check_pressure(config.pressure_warn_pct, serving)

    def _check_pressure(self, limit: float, serving: Callable[[], str | None]) -> None:
        """Memory `full` avg10 over the limit: every task stalled, the desktop starves."""
        memory = self.pressure.get("memory")
        if memory is None or memory.full is None:
            return
        stalled = memory.full.avg10
        if stalled > limit and not self._pressure_warned:
            self._pressure_warned = True
            active = serving() or "no engine"
            event(log, "desktop_pressure", "memory pressure: every task stalled %.1f %% of the "
                  "last 10 s (limit %g %%) while %s serves; the desktop is starving", stalled,
                  limit, active, level=logging.WARNING, SPARKD_MODEL=active)
        elif stalled < limit / 2 and self._pressure_warned:
            self._pressure_warned = False
            event(log, "desktop_pressure_cleared", "memory pressure back to %.1f %%", stalled)

    def machine_record(self, sup: Supervisor) -> MachineRecord:
        """The status's `machine` record (sparkd.daemon.machine)."""
        return machine_record(sup)

    # -- the memory floor -------------------------------------------------------------------

    def record_baselines(self, sup: Supervisor) -> None:
        """Each running engine's memory now (health timer): what the floor measures growth
        against."""
        if self.engine_memory is None:
            return
        now = sup.deps.clock()
        for name, view in sup.engines.items():
            current = (self.engine_memory(view.unit.main_pid)
                       if view.unit.running and view.unit.main_pid else None)
            if current is None:
                self.baseline.pop(name, None)
            else:
                self.baseline[name] = (now, current)

    async def floor_sample(self, sup: Supervisor) -> float:
        """One reading of MemAvailable; a stop of the engine that grows when the rule trips.
        Returns the seconds until the next reading (next_reading_in)."""
        d = sup.config.daemon
        rule = FloorRule(int(d.memory_floor_gib * GIB), d.memory_floor_samples)
        if self.read_available is None or rule.disabled:
            self.floor = FloorCount()
            return next_reading_in(0, rule, d.memory_floor_interval_s)
        try:
            available = self.read_available()
        except (OSError, ValueError) as exc:
            if not self._floor_read_failed:
                self._floor_read_failed = True
                event(log, "memory_floor_unread", "the memory floor cannot read MemAvailable: "
                      "%s", exc, level=logging.ERROR)
            return d.memory_floor_interval_s
        self._floor_read_failed = False
        now = sup.deps.clock()
        self.floor = floor_step(self.floor, rule, available, now)
        if self.floor.trip:
            await self._stop_grower(sup, rule, available, now)
        return next_reading_in(available, rule, d.memory_floor_interval_s)

    async def _stop_grower(self, sup: Supervisor, rule: FloorRule, available: int,
                           now: float) -> None:
        engines = {
            name: EngineMemory(
                self.engine_memory(view.unit.main_pid) if self.engine_memory else None,
                self.baseline.get(name, (now, None))[1])
            for name, view in sup.engines.items()
            if view.unit.running and view.unit.main_pid and name not in self.stopping
        }
        found = culprit(engines)
        if found is None:
            return  # nothing to stop (or already stopping it): the kernel's OOM killer is left
        view = sup.engines[found.engine]
        since = self.baseline.get(found.engine, (now, 0))[0]
        first = self.floor.first_under_t if self.floor.first_under_t is not None else now
        growth = ("unknown growth" if found.growth is None else
                  f"{format_size(found.growth)} more than {now - since:.1f} s before")
        event(log, "memory_floor", "memory floor: MemAvailable %s under the floor of %s for %d "
              "readings (%.2f s); stopping %s, which holds %s (%s; %s) before the host "
              "wedges", format_size(available), format_size(rule.floor_bytes), rule.samples,
              now - first, found.engine, format_size(found.memory), growth, found.why,
              level=logging.ERROR, SPARKD_MODEL=found.engine,
              SPARKD_AVAILABLE_BYTES=str(available), SPARKD_FLOOR_BYTES=str(rule.floor_bytes),
              SPARKD_ENGINE_BYTES=str(found.memory),
              SPARKD_GROWTH_BYTES="" if found.growth is None else str(found.growth))
        self.actions.record("memory_floor_stop", found.engine, sup.deps.wall_clock(),
                            f"stopped: MemAvailable {format_size(available)} under the floor of "
                            f"{format_size(rule.floor_bytes)}, it held "
                            f"{format_size(found.memory)}")
        self.stopping.add(found.engine)
        unit = view.unit_name
        try:
            job = await sup.deps.systemd(lambda m: m.stop_unit(unit))
        except Exception:
            self.stopping.discard(found.engine)
            raise
        model = view.model.name
        why = (f"stopped at the memory floor: MemAvailable {format_size(available)} under "
               f"{format_size(rule.floor_bytes)}, the engine held {format_size(found.memory)}")
        changes: dict[str, object] = {"last_failure_model": model, "last_failure_reason": why}
        if sup.state.desired_model == model:
            changes["desired_model"] = None  # not started again by the next sparkd
        sup.state = sup.state.replace(**changes)
        sup.save_state()
        sup.spawn(self._stopped(sup, found.engine, job, first))

    async def _stopped(self, sup: Supervisor, name: str, job: str, first: float) -> None:
        try:
            result = await sup.wait_job(job, STOP_WAIT_S)
            took = sup.deps.clock() - first
            event(log, "memory_floor_stopped", "%s stopped (job %s) %.2f s after MemAvailable "
                  "fell under the floor", name, result, took, SPARKD_MODEL=name,
                  SPARKD_DURATION_MS=f"{took * 1000:.0f}")
            await sup.refresh_units([name])
        finally:
            self.stopping.discard(name)

    # -- liveness beyond /health ------------------------------------------------------------

    async def liveness(self, sup: Supervisor) -> None:
        """Scrape each running, healthy engine's /metrics (health timer), assess a window
        every `liveness_window_s`, restart on the last strike."""
        d = sup.config.daemon
        if self.scrape is None or d.liveness_strikes == 0:
            return
        now = sup.deps.clock()
        gpu = self._gpu_sample(now)
        for name, view in list(sup.engines.items()):
            if not (view.unit.running and view.health is not None and view.health.ok):
                self.live.pop(name, None)
                continue
            text = await self.scrape(f"{engine_url(view.port)}/metrics")
            sample = (lv.engine_sample(view.model.engine, text, now) if text is not None
                      else lv.EngineSample(now, None, None))
            window = self.live.setdefault(name, LiveWindow())
            window.engine.append(sample)
            if gpu is not None:
                window.gpu.append(gpu)
            if now - window.engine[0].t < d.liveness_window_s:
                continue
            verdict = lv.assess(window.engine, window.gpu, self._thresholds(d))
            window.strikes = lv.strike(
                replace(window.strikes, limit=d.liveness_strikes), verdict)
            window.last = verdict
            # The next window starts at this sample: windows touch, never overlap.
            window.engine, window.gpu = [sample], ([gpu] if gpu is not None else [])
            if verdict.state is lv.State.HUNG:
                event(log, "engine_stalled", "%s: no token in %.0f s while %s requests ran "
                      "(%s); strike %d of %d", name, verdict.evidence.seconds,
                      _n(verdict.evidence.requests_running_min), _evidence(verdict),
                      window.strikes.count or d.liveness_strikes, d.liveness_strikes,
                      level=logging.WARNING, SPARKD_MODEL=name)
            if window.strikes.restart and sup.swap_run is None:
                self.live.pop(name, None)
                await health.restart_stalled(sup, name, view, verdict, d.liveness_strikes)

    def _gpu_sample(self, now: float) -> lv.GpuSample | None:
        if self.gpu is None or not self.gpu.gpus:
            return None
        g = self.gpu.gpus[0]  # a Spark has one GPU
        return lv.GpuSample(now, g.utilization_pct, g.memory_utilization_pct, g.power_w)

    def _thresholds(self, d: DaemonConfig) -> lv.Thresholds:
        name = self.gpu.gpus[0].name if self.gpu is not None and self.gpu.gpus else ""
        no_gpu = self.gpu is None or not self.gpu.gpus
        return replace(lv.thresholds_for(name), min_window_s=d.liveness_window_s,
                       stall_without_gpu=d.liveness_without_gpu and no_gpu)


def _n(value: float | None) -> str:
    return "?" if value is None else f"{value:g}"


def _evidence(verdict: lv.Verdict) -> str:
    ev = verdict.evidence
    gpu = ("no GPU reading" if ev.utilization_pct is None else
           f"GPU {ev.utilization_pct:g} % busy, memory {_n(ev.memory_utilization_pct)} %, "
           f"{_n(ev.power_w)} W")
    return (f"{', '.join(r.value for r in verdict.reasons)}: tokens +{_n(ev.tokens_delta)}, "
            f"{gpu}")


async def floor_loop(sup: Supervisor) -> None:
    """The memory floor's own timer: MemAvailable every `memory_floor_interval_s` near the
    floor, less often far above it (next_reading_in)."""
    delay = sup.config.daemon.memory_floor_interval_s
    while True:
        await asyncio.sleep(delay)
        delay = sup.config.daemon.memory_floor_interval_s
        try:
            delay = await sup.watch.floor_sample(sup)
        except Exception as exc:  # never let the floor die quietly
            log.warning("memory floor check failed: %s", exc)

