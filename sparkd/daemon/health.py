"""The Supervisor's health decisions, on the health timer: probes, the last good model, hung
engines restarted (and whether the restart worked), crash loops rolled back. Functions over
the Supervisor, which keeps the state (split out of it for size, as control.py is)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sparkd.daemon.engines import EngineView
from sparkd.engine.probe import ProbeResult
from sparkd.engine.swap import start_timeout
from sparkd.errors import SparkdError
from sparkd.journal import event
from sparkd.monitor.liveness import Verdict
from sparkd.systemd.manager import UnitStatus

if TYPE_CHECKING:
    from sparkd.daemon.supervisor import Supervisor

log = logging.getLogger(__name__)


async def crash_loop(sup: Supervisor, model: str, status: UnitStatus) -> None:
    unit = sup.engines[model].unit_name
    back = sup.state.last_good_model
    why = (f"crash loop: systemd gave up after {status.n_restarts} restarts "
           f"(result {status.result})")
    event(log, "engine_crash_loop", "%s: %s%s", model, why,
          f"; rolling back to {back}" if back and back != model else "; no other last good "
          "model to roll back to", level=logging.ERROR, SPARKD_MODEL=model)
    sup.state = sup.state.replace(last_failure_model=model, last_failure_reason=why)
    sup.save_state()
    await sup.deps.systemd(lambda m: m.reset_failed_unit(unit))
    if back and back != model and back in sup.engines:
        try:
            sup.request_swap(back, reason=f"rollback: {model} crash-looped")
        except SparkdError as exc:
            log.error("rollback to %s after the crash loop of %s failed: %s", back, model,
                      exc.message)
    await sup.refresh_units([model])



async def check_health(sup: Supervisor) -> None:
    if sup.state_unsaved is not None:
        sup.save_state()  # the disk may have room again
    if sup.config_unsaved is not None and sup.config_refused is None:
        sup.accept_config(sup.config)
    for name, view in list(sup.engines.items()):
        if not view.unit.running:
            continue
        result = await sup.deps.probe(view.health_url)
        view.health = result
        now = sup.deps.clock()
        if result.ok:
            view.health_failures = 0
            view.healthy_since = view.healthy_since or now
            maybe_last_good(sup, name, view, now)
            continue
        view.health_failures += 1
        view.healthy_since = None
        if (
            view.unit.active_state == "active"
            and view.unit.sub_state == "running"
            and view.health_failures >= sup.config.daemon.hung_after_failures
            and sup.swap_run is None
        ):
            await restart_hung(sup, name, view, result)
    sup.devices.check_volumes(sup)  # an unmount sends no uevent
    await sup.watch.sample(sup.config.daemon, sup.active_model)
    sup.watch.record_baselines(sup)
    await sup.watch.liveness(sup)
    await sup.watch.ladder.tick(sup)
    sup.update_status()


def maybe_last_good(sup: Supervisor, name: str, view: EngineView, now: float) -> None:
    if (
        name == sup.state.desired_model
        and sup.state.last_good_model != name
        and sup.swap_run is None
        and view.healthy_since is not None
        and now - view.healthy_since >= sup.config.daemon.last_good_after_s
    ):
        sup.state = sup.state.replace(last_good_model=name)
        sup.save_state()
        event(log, "last_good", "%s is now the last good model (healthy for %.0f s)", name,
              now - view.healthy_since, SPARKD_MODEL=name)


async def restart_hung(sup: Supervisor, name: str, view: EngineView, result: ProbeResult) -> None:
    unit = view.unit_name
    event(log, "engine_hung", "%s is hung: process %d alive, %d health checks failed in a "
          "row (last: %s); restarting it", name, view.unit.main_pid, view.health_failures,
          result.describe(), level=logging.ERROR, SPARKD_MODEL=name)
    sup.watch.actions.record("hung_restart", name, sup.deps.wall_clock(),
                             f"restarted: {view.health_failures} health checks failed "
                             f"({result.describe()})")
    view.health_failures = 0
    job = await sup.deps.systemd(lambda m: m.restart_unit(unit))
    sup.spawn(restart_done(sup, name, job))


async def restart_stalled(sup: Supervisor, name: str, view: EngineView, verdict: Verdict,
                          strikes: int) -> None:
    """/health answers 200 but no token comes out while requests run (liveness, three
    strikes): the same restart as a hung engine's, with the evidence in the event."""
    unit = view.unit_name
    ev = verdict.evidence
    gpu = ("no GPU reading" if ev.utilization_pct is None else
           f"GPU {ev.utilization_pct:g} % busy, memory utilization "
           f"{'?' if ev.memory_utilization_pct is None else f'{ev.memory_utilization_pct:g}'} %, "
           f"{'?' if ev.power_w is None else f'{ev.power_w:g}'} W")
    event(log, "engine_hung", "%s is hung though /health answers 200: %d windows in a row of "
          "%.0f s without a generated token while %s requests ran (%s; %s); process %d "
          "alive; restarting it", name, strikes, ev.seconds,
          "?" if ev.requests_running_min is None else f"{ev.requests_running_min:g}",
          ", ".join(r.value for r in verdict.reasons), gpu, view.unit.main_pid,
          level=logging.ERROR, SPARKD_MODEL=name, SPARKD_REASON="liveness")
    sup.watch.actions.record("liveness_restart", name, sup.deps.wall_clock(),
                             f"restarted: no token in {ev.seconds:.0f} s while requests ran, "
                             f"{strikes} strikes ({gpu})")
    job = await sup.deps.systemd(lambda m: m.restart_unit(unit))
    sup.spawn(restart_done(sup, name, job))


async def restart_done(sup: Supervisor, name: str, job: str) -> None:
    """Say how the restart of a hung engine ended: a failed one is not a success."""
    result = await sup.wait_job(job, start_timeout(sup.config, name.split(":")[0]))
    if result == "done":
        event(log, "engine_restarted_after_hang", "%s restarted and serves again", name,
              SPARKD_MODEL=name)
    else:
        event(log, "engine_restart_failed", "%s: the restart after the hang failed (job "
              "%s)", name, result, level=logging.ERROR, SPARKD_MODEL=name)
