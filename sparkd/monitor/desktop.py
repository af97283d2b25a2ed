"""PURE: the desktop ladder's rules (issue 13, docs/watch.md "The desktop ladder").

Readings in (PSI, the lateness probe's p99, whether a desktop is present, the engine's kind and
MoE backend), a decision out, with its reasons as data:

- `over(readings, limits)`: every signal over its threshold now (`Over`), or none;
- `decide(state, readings, limits)`: over for `over_s` in a row -> the next ladder step that
  applies (steps that do not apply are skipped, each with why); under for `restore_s` in a
  row -> restore; no desktop -> nothing, and a ladder already climbed is restored.

Nothing here touches systemd or the clock: the adapter (sparkd.daemon.desktop) passes `t`.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Final

from sparkd.monitor.psi import RESOURCES, Pressure


class Step(enum.StrEnum):
    WEIGHTS = "weights"  # lower sparkd.slice's CPUWeight=, IOWeight= (and MemoryHigh=)
    LATENCY_MOE = "latency_moe"  # vLLM: restart with the latency MoE backend
    STOP = "stop"  # stop the engine


class Action(enum.StrEnum):
    NONE = "none"
    STEP = "step"
    RESTORE = "restore"


#: PSI lines a threshold can be set on: ("cpu", "some") ... ("io", "full").
PSI_LINES: Final = tuple((r, k) for r in RESOURCES for k in ("some", "full"))


@dataclass(frozen=True, slots=True)
class Limits:
    #: (resource, "some"|"full") -> avg10 percent over which the desktop suffers; absent or 0: off.
    psi_pct: Mapping[tuple[str, str], float] = field(default_factory=dict)
    lateness_p99_ms: float = 0.0  # 0: the probe is not used
    over_s: float = 10.0
    restore_s: float = 60.0
    ladder: tuple[Step, ...] = (Step.WEIGHTS, Step.LATENCY_MOE, Step.STOP)


@dataclass(frozen=True, slots=True)
class EngineFacts:
    """What the steps need to know about the engine the ladder acts on."""

    name: str
    kind: str  # vllm, sglang, llamacpp, sim, external
    moe_backend: str | None  # what its start log says it chose (fingerprints); None: not said
    #: Why the latency MoE kernels cannot run for this engine here (None: they can): vLLM runs
    #: them only on compute capability 10.x; elsewhere a release before 0.17 falls back to
    #: CUTLASS and a later one refuses the start (docs/units.md "The MoE pin").
    latency_blocked: str | None = None


@dataclass(frozen=True, slots=True)
class Readings:
    t: float
    pressure: Mapping[str, Pressure]
    lateness_p99_ms: float | None  # None: no fresh report from the probe
    desktop: bool
    engine: EngineFacts | None  # None: no engine running


@dataclass(frozen=True, slots=True)
class Over:
    """One signal over its threshold: `signal` is `psi.cpu.some` ... or `lateness_p99`."""

    signal: str
    value: float
    limit: float

    def __str__(self) -> str:
        unit = "ms" if self.signal == "lateness_p99" else "%"
        return f"{self.signal} {self.value:.1f} {unit} > {self.limit:g} {unit}"


@dataclass(frozen=True, slots=True)
class Skipped:
    step: Step
    why: str


@dataclass(frozen=True, slots=True)
class LadderState:
    level: int = 0  # steps of the ladder taken (applied or skipped)
    over_since: float | None = None
    under_since: float | None = None


@dataclass(frozen=True, slots=True)
class Decision:
    action: Action
    state: LadderState
    step: Step | None = None  # the step to take (Action.STEP)
    reasons: tuple[Over, ...] = ()
    skipped: tuple[Skipped, ...] = ()  # steps passed over on the way to `step`
    why: str = ""  # in words, for the journal


def over(readings: Readings, limits: Limits) -> tuple[Over, ...]:
    found: list[Over] = []
    for (resource, kind), limit in sorted(limits.psi_pct.items()):
        if limit <= 0:
            continue
        pressure = readings.pressure.get(resource)
        line = None if pressure is None else (pressure.some if kind == "some" else pressure.full)
        if line is not None and line.avg10 > limit:
            found.append(Over(f"psi.{resource}.{kind}", line.avg10, limit))
    late = readings.lateness_p99_ms
    if limits.lateness_p99_ms > 0 and late is not None and late > limits.lateness_p99_ms:
        found.append(Over("lateness_p99", late, limits.lateness_p99_ms))
    return tuple(found)


def not_applicable(step: Step, engine: EngineFacts, latency_backend: str) -> str | None:
    """Why `step` cannot act on `engine` (None: it can)."""
    if step is Step.LATENCY_MOE:
        if engine.kind != "vllm":
            return f"{engine.name} is a {engine.kind} engine, not vLLM"
        if engine.moe_backend is None:
            return f"{engine.name}'s log names no MoE backend (a dense model?)"
        if engine.moe_backend == latency_backend:
            return f"{engine.name} already runs the latency MoE backend {latency_backend}"
        if engine.latency_blocked is not None:
            return engine.latency_blocked
    return None


def decide(state: LadderState, readings: Readings, limits: Limits, *,
           latency_backend: str) -> Decision:
    t = readings.t
    if not readings.desktop:
        fresh = LadderState()
        if state.level > 0:
            return Decision(Action.RESTORE, fresh, why="no desktop any more")
        return Decision(Action.NONE, fresh, why="headless: no desktop to protect")
    reasons = over(readings, limits)
    if not reasons:
        under_since = state.under_since if state.under_since is not None else t
        calm = replace(state, over_since=None, under_since=under_since)
        if state.level > 0 and t - under_since >= limits.restore_s:
            return Decision(Action.RESTORE, LadderState(),
                            why=f"pressure under every threshold for {t - under_since:.0f} s")
        return Decision(Action.NONE, calm)
    over_since = state.over_since if state.over_since is not None else t
    hot = replace(state, over_since=over_since, under_since=None)
    if t - over_since < limits.over_s or state.level >= len(limits.ladder):
        return Decision(Action.NONE, hot, reasons=reasons)
    if readings.engine is None:
        return Decision(Action.NONE, hot, reasons=reasons, why="no engine running")
    skipped: list[Skipped] = []
    for level in range(state.level, len(limits.ladder)):
        step = limits.ladder[level]
        why = not_applicable(step, readings.engine, latency_backend)
        if why is None:
            # The next step waits another over_s from now: each step gets time to work.
            nxt = LadderState(level=level + 1, over_since=t)
            return Decision(Action.STEP, nxt, step=step, reasons=reasons,
                            skipped=tuple(skipped), why=f"over for {t - over_since:.0f} s")
        skipped.append(Skipped(step, why))
    return Decision(Action.NONE, LadderState(level=len(limits.ladder), over_since=t),
                    reasons=reasons, skipped=tuple(skipped), why="no step left that applies")


# -- the lateness probe's window ------------------------------------------------------------


def p99(samples: Sequence[float]) -> float:
    """The 99th percentile (nearest rank) of `samples`; nan when there are none."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = math.ceil(0.99 * len(ordered))
    return ordered[max(rank, 1) - 1]


# -- desktop presence -----------------------------------------------------------------------

#: logind session types of a graphical session (org.freedesktop.login1 Session.Type).
GRAPHICAL_SESSION_TYPES: Final = frozenset({"x11", "wayland", "mir"})
#: Process names of display servers and compositors, as NVML's graphics processes show them.
DISPLAY_SERVERS: Final = frozenset({
    "Xorg", "X", "Xwayland", "gnome-shell", "kwin_wayland", "kwin_x11", "sway", "weston",
    "mutter", "gdm-x-session", "Hyprland", "cosmic-comp", "labwc",
})


@dataclass(frozen=True, slots=True)
class Presence:
    present: bool
    why: str
    #: False when neither source could be read: the ladder treats the machine as headless
    #: (it acts on no guess), status says "unknown", not "headless".
    known: bool = True


def desktop_presence(session_types: Sequence[str] | None,
                     graphics_process_names: Sequence[str] | None,
                     forced: str = "detect") -> Presence:
    """A desktop is present when logind has a graphical session or a display server is among
    the GPU's graphics processes. `forced` ("present"/"absent") overrides detection (tests, a
    container without logind). None: that source could not be read."""
    if forced == "present":
        return Presence(present=True, why="forced by daemon.desktop_presence = \"present\"")
    if forced == "absent":
        return Presence(present=False, why="forced by daemon.desktop_presence = \"absent\"")
    graphical = sorted(t for t in (session_types or ()) if t in GRAPHICAL_SESSION_TYPES)
    if graphical:
        return Presence(present=True, why=f"logind graphical session ({', '.join(graphical)})")
    servers = sorted({n for n in (graphics_process_names or ())
                      if n.rsplit("/", 1)[-1] in DISPLAY_SERVERS})
    if servers:
        return Presence(present=True, why=f"display server on the GPU ({', '.join(servers)})")
    unread = [name for name, v in (("logind", session_types),
                                   ("NVML", graphics_process_names)) if v is None]
    return Presence(present=False, why="no graphical session and no display server"
                    + (f" ({', '.join(unread)} unread)" if unread else ""),
                    known=len(unread) < 2)
