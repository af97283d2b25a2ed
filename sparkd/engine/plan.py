"""PURE: swap planning. (config, state, target, machine snapshot) -> a plan, or the reason not.

`sparkctl swap --dry-run` prints `SwapPlan.describe()`; the executor (`sparkd.engine.swap`)
runs the plan step by step and walks `SwapStep` with `next_step`.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass

from sparkd.config import Config, ModelConfig
from sparkd.engine.unit import engine_url
from sparkd.errors import SwapRefused
from sparkd.state import State
from sparkd.systemd.manager import UnitStatus

GIB = 1 << 30


class SwapStep(enum.StrEnum):
    """The steps of a swap and where each leads::

        PREFLIGHT ──ok──▶ STOP ──ok──▶ START ──ok──▶ HEALTH_GATE ──ok──▶ FLIP ──▶ DONE
            │               │            │                │
          fails           fails        fails            fails
            ▼               └────────────┴───────┬────────┘
         REFUSED                                 ▼
        (nothing changed)                    ROLLBACK ──ok──▶ ROLLED_BACK
                                                 └──fails──▶ ROLLBACK_FAILED

    PREFLIGHT: the model is known and supervised, its files are there, it fits the machine.
    STOP: the active engine stops; its processes are gone (the stop job waits for them).
    START: the target's unit starts; its ExecStartPre prestart drops the page cache, waits
      for MemAvailable to settle and gates on memory; its ExecStartPost waits for /health.
    HEALTH_GATE: /health answers 200 and /v1/models lists the model.
    FLIP: the state's desired model becomes the target; subscribers (the gateway) are told.
    ROLLBACK: stop the target, start the last good model.
    """

    PREFLIGHT = "preflight"
    STOP = "stop"
    START = "start"
    HEALTH_GATE = "health_gate"
    FLIP = "flip"
    DONE = "done"
    REFUSED = "refused"
    ROLLBACK = "rollback"
    ROLLED_BACK = "rolled_back"
    ROLLBACK_FAILED = "rollback_failed"

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset(
    {SwapStep.DONE, SwapStep.REFUSED, SwapStep.ROLLED_BACK, SwapStep.ROLLBACK_FAILED}
)

_ON_OK: Mapping[SwapStep, SwapStep] = {
    SwapStep.PREFLIGHT: SwapStep.STOP,
    SwapStep.STOP: SwapStep.START,
    SwapStep.START: SwapStep.HEALTH_GATE,
    SwapStep.HEALTH_GATE: SwapStep.FLIP,
    SwapStep.FLIP: SwapStep.DONE,
    SwapStep.ROLLBACK: SwapStep.ROLLED_BACK,
}
_ON_FAIL: Mapping[SwapStep, SwapStep] = {
    SwapStep.PREFLIGHT: SwapStep.REFUSED,
    SwapStep.STOP: SwapStep.ROLLBACK,
    SwapStep.START: SwapStep.ROLLBACK,
    SwapStep.HEALTH_GATE: SwapStep.ROLLBACK,
    SwapStep.FLIP: SwapStep.ROLLBACK,
    SwapStep.ROLLBACK: SwapStep.ROLLBACK_FAILED,
}


def next_step(step: SwapStep, *, ok: bool) -> SwapStep:
    if step.terminal:
        raise ValueError(f"{step} is terminal")
    return (_ON_OK if ok else _ON_FAIL)[step]


@dataclass(frozen=True, slots=True)
class Snapshot:
    """The machine as the planner sees it."""

    mem_total: int
    mem_available: int
    units: Mapping[str, UnitStatus]  # engine key (model, or "model:spec") -> its unit's status
    path_exists: Mapping[str, bool]  # model name -> whether its weights path exists


@dataclass(frozen=True, slots=True)
class SwapPlan:
    target: str
    from_model: str | None  # the model serving before (None: nothing)
    stop: tuple[str, ...]  # units to stop first, in order
    start: str  # the target's unit
    health_url: str
    models_url: str
    gate_timeout_s: float
    rollback_to: str | None  # the model to bring back when the swap fails
    noop: bool = False  # the target already serves: nothing to do
    # Set when the target would not fit in memory now, even once the engines to stop have
    # let go of theirs: prestart's memory gate would refuse the start (and the swap roll back).
    fit_note: str | None = None

    def describe(self) -> list[str]:
        if self.noop:
            return [f"{self.target} is already serving: nothing to do"]
        lines = [f"swap {self.from_model or '(nothing)'} -> {self.target}"]
        if self.fit_note:
            lines.append(f"warning: {self.fit_note}")
        n = 1
        lines.append(f"{n}. preflight: {self.target} is configured, its files are there and "
                     "it fits the machine")
        for unit in self.stop:
            n += 1
            lines.append(f"{n}. stop {unit} and wait until its processes are gone")
        lines += [
            f"{n + 1}. start {self.start} (prestart: sync, drop the page cache, wait for "
            "memory to settle, memory gate; then the load)",
            f"{n + 2}. health gate: {self.health_url} answers 200 and {self.models_url} lists "
            f"{self.target}, within {self.gate_timeout_s:g} s",
            f"{n + 3}. flip: {self.target} becomes the desired model; the gateway is told",
        ]
        back = self.rollback_to or "nothing (no last good model)"
        lines.append(f"on failure: stop {self.start}, start {back}")
        return lines


def plan_swap(config: Config, state: State, target: str, snap: Snapshot) -> SwapPlan:
    """Raises UnknownModel or SwapRefused (with the reason) when the swap cannot start."""
    model = config.model(target)  # UnknownModel
    _preflight(config, model, snap)
    # Every running engine of another model, speculative variants included, stops first; the
    # target's own speculative variant (started after the swap) is left alone.
    others = [
        (key, status)
        for key, status in sorted(snap.units.items())
        if status.running and key.split(":", 1)[0] != target
        and key.split(":", 1)[0] in config.models
    ]
    running = [key.split(":", 1)[0] for key, _ in others]
    target_status = snap.units.get(target)
    serving = target_status is not None and target_status.active_state == "active"
    from_model = state.desired_model if state.desired_model != target else None
    if from_model is None and running:
        from_model = running[0]
    rollback_to = state.last_good_model or from_model
    if rollback_to == target:
        rollback_to = from_model if from_model != target else None
    if rollback_to is not None and rollback_to not in config.models:
        rollback_to = None
    base = engine_url(model.port)
    freed = sum(config.models[key.split(":", 1)[0]].memory_gib_for(
        "speculative" if key.endswith(":spec") else "plain") for key, _ in others)
    return SwapPlan(
        fit_note=fit_note(config, model, snap.mem_available, freed_gib=freed,
                          stopping=[s.name for _, s in others]),
        target=target,
        from_model=from_model,
        stop=tuple(status.name for _, status in others),
        start=model.unit_name,
        health_url=f"{base}/health",
        models_url=f"{base}/v1/models",
        gate_timeout_s=model.load_timeout_s,
        rollback_to=rollback_to,
        noop=serving and not running and state.desired_model == target,
    )


def fit_note(config: Config, model: ModelConfig, available: int, *, freed_gib: float,
             stopping: list[str]) -> str | None:
    """Why the target would not fit now (None: it would). What the engines to stop hold is
    counted as free again (their configured memory_gib: an estimate)."""
    need = model.memory_gib + config.daemon.memory_reserve_gib
    after = available / GIB + freed_gib
    if need <= after:
        return None
    once = f" once {', '.join(stopping)} stop" if stopping else ""
    return (f"{model.name} would not fit now: it needs {model.memory_gib:g} GiB + "
            f"{config.daemon.memory_reserve_gib:g} GiB reserve, about {after:.1f} GiB would "
            f"be available{once}; prestart's memory gate would refuse the start and the swap "
            "would roll back (stop other work on the machine first)")


def _preflight(config: Config, model: ModelConfig, snap: Snapshot) -> None:
    if not model.supervised:
        raise SwapRefused(
            f"{model.name} is engine = \"external\": sparkd routes to it but does not run it"
        )
    # The simulated engine writes its own weights on first start; real engines need theirs.
    if model.engine != "sim" and not snap.path_exists.get(model.name, False):
        raise SwapRefused(
            f"{model.name}: its weights are missing at {model.path} "
            f"(sparkctl pull {model.name}, or fix models.{model.name}.path)"
        )
    need = (model.memory_gib + config.daemon.memory_reserve_gib) * GIB
    if need > snap.mem_total:
        raise SwapRefused(
            f"{model.name} needs {model.memory_gib:g} GiB + {config.daemon.memory_reserve_gib:g}"
            f" GiB reserve, more than this machine's {snap.mem_total / GIB:.1f} GiB in all"
        )

