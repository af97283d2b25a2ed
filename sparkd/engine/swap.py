"""The swap executor: runs a `SwapPlan` against systemd and the engines, step by step.

Every step is a journald event (`swap_step`, with SPARKD_STEP and SPARKD_DURATION_MS) and is
persisted through the context, so a sparkd killed mid-swap knows where it was. A failed step
leads to ROLLBACK (see `SwapStep`): stop the target, start the last good model. Nothing is
left half-started.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

from sparkd.config import Config
from sparkd.engine.fingerprints import Match, fatal_match, match_lines
from sparkd.engine.plan import SwapPlan, SwapStep, next_step
from sparkd.engine.probe import ProbeResult
from sparkd.engine.unit import STOP_WAIT_S, engine_url, start_wait_s
from sparkd.errors import SparkdError
from sparkd.journal import event
from sparkd.systemd.manager import SystemdManager, UnitStatus

log = logging.getLogger(__name__)

T = TypeVar("T")

GATE_POLL_S = 0.1
JOURNAL_TAIL_LINES = 12

_ids = itertools.count(1)


class SwapContext(Protocol):
    """What the executor needs from the daemon (the Supervisor implements it)."""

    @property
    def config(self) -> Config: ...

    async def systemd(self, fn: Callable[[SystemdManager], T]) -> T: ...

    async def wait_job(self, job: str, timeout_s: float) -> str: ...

    async def probe(self, url: str) -> ProbeResult: ...

    async def models_listed(self, url: str, model: str) -> bool: ...

    async def journal_since(self, unit: str, since: float) -> list[str]: ...

    async def verify_files(self, model: str) -> str: ...

    def swap_progress(self, run: SwapRun) -> None: ...

    def swap_flip(self, run: SwapRun) -> None: ...

    def swap_finished(self, run: SwapRun) -> None: ...

    def fingerprints_found(self, model: str, matches: list[Match]) -> None: ...


@dataclass(slots=True)
class StepRecord:
    step: SwapStep
    ok: bool
    duration_ms: float
    detail: str


@dataclass(slots=True)
class SwapRun:
    plan: SwapPlan
    reason: str = "requested"
    id: int = field(default_factory=lambda: next(_ids))
    step: SwapStep = SwapStep.PREFLIGHT
    started_at: float = field(default_factory=time.time)
    started_mono: float = field(default_factory=time.monotonic)
    history: list[StepRecord] = field(default_factory=list)
    failure: str | None = None
    finished_mono: float | None = None

    @property
    def done(self) -> bool:
        return self.step.terminal

    @property
    def succeeded(self) -> bool:
        return self.step is SwapStep.DONE

    @property
    def duration_ms(self) -> float:
        end = self.finished_mono if self.finished_mono is not None else time.monotonic()
        return (end - self.started_mono) * 1000


class StepFailed(Exception):
    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


async def execute(run: SwapRun, ctx: SwapContext) -> SwapRun:
    """Walk the plan from STOP (planning was the preflight) to a terminal step."""
    plan = run.plan
    fields = {"SPARKD_FROM": plan.from_model or "", "SPARKD_TO": plan.target,
              "SPARKD_MODEL": plan.target, "SPARKD_SWAP": run.id}
    event(log, "swap_started", "swap %d: %s -> %s (%s)", run.id, plan.from_model or "nothing",
          plan.target, run.reason, common=fields)
    ctx.swap_progress(run)
    steps: dict[SwapStep, Callable[[SwapRun, SwapContext], Awaitable[str]]] = {
        SwapStep.PREFLIGHT: _preflight,
        SwapStep.STOP: _stop,
        SwapStep.START: _start,
        SwapStep.HEALTH_GATE: _health_gate,
        SwapStep.FLIP: _flip,
        SwapStep.ROLLBACK: _rollback,
    }
    while not run.step.terminal:
        step = run.step
        began = time.monotonic()
        try:
            detail, ok = await steps[step](run, ctx), True
        except StepFailed as exc:
            detail, ok = exc.detail, False
        except (SparkdError, TimeoutError) as exc:
            detail, ok = f"{type(exc).__name__}: {exc}", False
        took = (time.monotonic() - began) * 1000
        run.history.append(StepRecord(step, ok=ok, duration_ms=took, detail=detail))
        if not ok and step is not SwapStep.ROLLBACK:
            run.failure = f"{step.value}: {detail}"
        run.step = next_step(step, ok=ok)
        event(
            log,
            "swap_step",
            "swap %d: %s %s in %.0f ms: %s",
            run.id,
            step.value,
            "ok" if ok else "FAILED",
            took,
            detail,
            level=logging.INFO if ok else logging.WARNING,
            SPARKD_STEP=step.value,
            SPARKD_DURATION_MS=f"{took:.1f}",
            SPARKD_OK=int(ok),
            common=fields,
        )
        if step is SwapStep.ROLLBACK:
            event(log, "rollback", "swap %d: rollback to %s %s: %s", run.id,
                  plan.rollback_to or "nothing", "done" if ok else "FAILED", detail,
                  level=logging.WARNING if ok else logging.ERROR,
                  SPARKD_DURATION_MS=f"{took:.1f}", common=fields)
        ctx.swap_progress(run)
    run.finished_mono = time.monotonic()
    total = f"{run.duration_ms:.1f}"
    if run.succeeded:
        event(log, "swap_done", "swap %d: %s serves (%.0f ms)", run.id, plan.target,
              run.duration_ms, SPARKD_DURATION_MS=total, common=fields)
    else:
        event(log, "swap_failed", "swap %d to %s failed: %s; %s", run.id, plan.target,
              run.failure, _outcome(run), level=logging.ERROR, SPARKD_DURATION_MS=total,
              common=fields)
    ctx.swap_finished(run)
    return run


def _outcome(run: SwapRun) -> str:
    if run.step is SwapStep.REFUSED:
        return "nothing was changed"
    if run.step is SwapStep.ROLLED_BACK:
        return f"rolled back to {run.plan.rollback_to}" if run.plan.rollback_to else (
            "stopped it; no last good model to roll back to")
    return "the rollback failed too"


async def _preflight(run: SwapRun, ctx: SwapContext) -> str:
    """The planner checked the config and the machine; here the target's files are verified
    (incrementally) while the old model still serves, so a bad file costs no downtime."""
    return await ctx.verify_files(run.plan.target)


async def _stop_unit(ctx: SwapContext, unit: str) -> None:
    job = await ctx.systemd(lambda m: m.stop_unit(unit))
    result = await ctx.wait_job(job, STOP_WAIT_S)
    status = await ctx.systemd(lambda m: m.unit_status(unit))
    if result != "done" or status.running or status.main_pid:
        raise StepFailed(
            f"{unit} did not stop (job {result}, {status.active_state}/{status.sub_state}, "
            f"pid {status.main_pid})"
        )


async def _stop(run: SwapRun, ctx: SwapContext) -> str:
    for unit in run.plan.stop:
        await _stop_unit(ctx, unit)
    return f"stopped {', '.join(run.plan.stop)}" if run.plan.stop else "nothing to stop"


def start_afresh(m: SystemdManager, unit: str) -> str:
    """Start a unit, clearing a failed state first (a failed unit past its start limit would
    refuse the start). Blocking: runs in the systemd thread. Returns the job path."""
    if m.unit_status(unit).active_state == "failed":
        m.reset_failed_unit(unit)
    return m.start_unit(unit)


def start_timeout(config: Config, model_name: str) -> float:
    """How long to wait for the model's start job: its unit's TimeoutStartSec and a margin."""
    return start_wait_s(config.models[model_name].load_timeout_s,
                        config.daemon.settle_timeout_s)


async def _start_model(ctx: SwapContext, model_name: str) -> str:
    model = ctx.config.models[model_name]
    unit = model.unit_name
    since = time.time()
    job = await ctx.systemd(lambda m: start_afresh(m, unit))
    result = await ctx.wait_job(job, start_timeout(ctx.config, model_name))
    lines = await ctx.journal_since(unit, since)
    matches = match_lines(lines, engine=model.engine)
    if matches:
        ctx.fingerprints_found(model_name, matches)
    fatal = fatal_match(matches)
    # A refused MoE backend (sparkd.engine.fingerprints) is the reason, first.
    reason = None if fatal is None else f"{fatal.fingerprint.meaning}: {fatal.line}"
    if result == "done":
        if reason is not None:
            raise StepFailed(reason)
        return f"{unit} active"
    status: UnitStatus = await ctx.systemd(lambda m: m.unit_status(unit))
    why = [f"{unit} start job {result}", f"result {status.result}"]
    if status.exec_main_status:
        why.append(f"exit status {status.exec_main_status}")
    found = [f"{m.fingerprint.id}: {m.line}" for m in matches if m.fingerprint.severity != "info"]
    tail = [line for line in lines if line.strip()][-JOURNAL_TAIL_LINES:]
    # The real reason first: a refused MoE backend, else the memory gate's refusal or the
    # health wait's verdict; then the job's result.
    if fatal is not None:
        found = [f for f in found if not f.endswith(fatal.line)]
    else:
        reason = start_failure_reason(lines)
    detail = ", ".join(why) if reason is None else f"{reason} ({', '.join(why)})"
    if found:
        detail += "; " + "; ".join(found)
    if tail:
        detail += "; last lines: " + " | ".join(tail)
    raise StepFailed(detail)


# The lines of sparkd's own start helpers that say why a start failed, most telling first:
# the memory gate's refusal (sparkd.engine.prestart) and the health wait's verdict
# (sparkd.engine.health, `sparkd wait-healthy`).
_REASON_LINES = (
    re.compile(r"^prestart \S+: refused: .*"),
    re.compile(r"^wait-healthy: .*(?:not healthy after|exited before it became healthy).*"),
)


def start_failure_reason(lines: list[str]) -> str | None:
    """The line that says why an engine's start failed, when one of sparkd's helpers wrote
    it (the last such line: a restarted unit may have logged earlier attempts)."""
    for pattern in _REASON_LINES:
        found = [line.strip() for line in lines if pattern.match(line.strip())]
        if found:
            return found[-1]
    return None


async def _start(run: SwapRun, ctx: SwapContext) -> str:
    return await _start_model(ctx, run.plan.target)


async def _gate(ctx: SwapContext, model_name: str, timeout_s: float) -> str:
    model = ctx.config.models[model_name]
    base = engine_url(model.port)
    deadline = time.monotonic() + timeout_s
    last = "no probe yet"
    while True:
        health = await ctx.probe(f"{base}/health")
        if health.ok:
            if await ctx.models_listed(f"{base}/v1/models", model_name):
                return f"/health 200 in {health.latency_ms:.1f} ms, /v1/models lists {model_name}"
            last = f"/v1/models does not list {model_name}"
        else:
            last = f"/health: {health.describe()}"
        if time.monotonic() >= deadline:
            raise StepFailed(f"not healthy within {timeout_s:g} s ({last})")
        await asyncio.sleep(GATE_POLL_S)


async def _health_gate(run: SwapRun, ctx: SwapContext) -> str:
    # A line that means the start failed (a refused MoE backend) fails the gate with that line
    # as the reason, however the engine's /health answers.
    model = ctx.config.models[run.plan.target]
    fatal = fatal_match(match_lines(await ctx.journal_since(model.unit_name, run.started_at),
                                    engine=model.engine))
    if fatal is not None:
        raise StepFailed(f"{fatal.fingerprint.meaning}: {fatal.line}")
    return await _gate(ctx, run.plan.target, run.plan.gate_timeout_s)


async def _flip(run: SwapRun, ctx: SwapContext) -> str:
    ctx.swap_flip(run)
    return f"{run.plan.target} is the desired model"


async def _rollback(run: SwapRun, ctx: SwapContext) -> str:
    await _stop_unit(ctx, run.plan.start)
    back = run.plan.rollback_to
    if back is None:
        return f"stopped {run.plan.start}; no last good model to start"
    await _start_model(ctx, back)
    await _gate(ctx, back, ctx.config.models[back].load_timeout_s)
    return f"stopped {run.plan.start}; {back} serves again"
