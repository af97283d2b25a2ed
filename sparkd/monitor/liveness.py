"""Liveness beyond /health: is an engine generating, idle, or hung? Pure rules over readings.

`/health` answers 200 after an engine's workers died or deadlocked (vLLM 16259, 11996; a
deadlocked GB10 engine in eugr/spark-vllm-docker 260: ../docs/watch.md). The honest signal is the
engine's generated-token counter not moving while it says requests are running. That alone also
describes a long prefill (no generated tokens until the prompt is in), so the rule asks NVML for
corroboration: a GPU that is busy but moves no memory is spinning, as a rank in a collective whose
peer never arrives does. Captured on an H200 (tests/fixtures/nvml/h200-*.json, medians of 0.5 s
samples): spinning kernels 100 % utilization, 0 % memory utilization, 120-137 W; bf16 matrix
products 99 %, 24 %, 691 W; a memory-bound decode loop 100 %, 99 %, 564 W; idle 0 %, 0 %, 77 W.

`assess(engine, gpu)` looks at one window (say 10-30 s) of samples and returns a `Verdict`:
the state, the reasons (as `Reason` codes) and the numbers it used (`Evidence`).

    tokens moved ................................................ busy    tokens_moving
    no tokens, no requests running .............................. idle    no_requests
    no tokens, requests running all window long (a stall; reasons start tokens_stalled):
        GPU busy with ~0 memory utilization ..................... hung    gpu_spinning
        GPU busy, memory utilization not reported (or not used:
          GB10), power at or under `spin_power_max_w` ........... hung    gpu_spinning_by_power
        GPU moving memory (a prefill, a slow step) .............. busy    gpu_working
        GPU idle (workers gone? NVML on another GPU?) ........... unknown gpu_idle
    anything missing, too short, reset or in between ............ unknown (the reason says which)

`strike(strikes, verdict)` counts consecutive hung windows; feed it one verdict per window
(windows must not overlap) and restart the engine when it says so:

                  hung              hung              hung
    ┌──────────┐  ───▶  ┌──────────┐  ───▶  ┌──────────┐  ───▶  restart=True, count back to 0
    │ count 0  │        │ count 1  │        │ count 2  │
    └──────────┘        └──────────┘        └──────────┘
         ▲    busy/idle      │     busy/idle      │
         ├───────────────────┘                    │
         └────────────────────────────────────────┘
    unknown, in any state: stay (no strike added, none cleared), restart=False

Unknown holds rather than clears so that a scrape that fails now and then cannot hide a hang
forever; it does not add a strike, so missing data never restarts an engine. NVML readings are
those of the GPU the engine runs on (a Spark has one); `engine_sample` reads an engine's
Prometheus text into an `EngineSample`.
"""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum
from typing import Any, Final

from prometheus_client.parser import text_string_to_metric_families


class State(StrEnum):
    HUNG = "hung"
    BUSY = "busy"
    IDLE = "idle"
    UNKNOWN = "unknown"


class Reason(StrEnum):
    TOKENS_MOVING = "tokens_moving"
    NO_REQUESTS = "no_requests"
    TOKENS_STALLED = "tokens_stalled"  # counter flat while requests ran all window long
    GPU_SPINNING = "gpu_spinning"  # utilization high, memory utilization ~0
    GPU_SPINNING_BY_POWER = "gpu_spinning_by_power"  # utilization high, power at spin level
    GPU_WORKING = "gpu_working"  # memory moving: a prefill or a slow step, not a hang
    GPU_IDLE = "gpu_idle"
    GPU_AMBIGUOUS = "gpu_ambiguous"  # between the thresholds
    POWER_TOO_HIGH_FOR_SPIN = "power_too_high_for_spin"
    NO_MEMORY_UTILIZATION = "no_memory_utilization"
    NO_GPU_READING = "no_gpu_reading"
    NO_TOKEN_COUNTER = "no_token_counter"
    NO_REQUEST_GAUGE = "no_request_gauge"
    COUNTER_RESET = "counter_reset"  # the engine restarted inside the window
    REQUESTS_NOT_STEADY = "requests_not_steady"  # running fell to 0 or rose from 0 in the window
    TOO_FEW_SAMPLES = "too_few_samples"
    WINDOW_TOO_SHORT = "window_too_short"
    NO_GPU_ON_MACHINE = "no_gpu_on_machine"  # stall_without_gpu: the stall alone is the hang


@dataclass(frozen=True, slots=True)
class EngineSample:
    t: float  # monotonic seconds
    generated_tokens: float | None  # the counter; None: not exported, or the scrape failed
    requests_running: float | None


@dataclass(frozen=True, slots=True)
class GpuSample:
    t: float
    utilization_pct: float | None  # NVML utilization.gpu
    memory_utilization_pct: float | None  # NVML utilization.memory
    power_w: float | None


@dataclass(frozen=True, slots=True)
class Thresholds:
    min_window_s: float = 10.0  # a stall shorter than this says nothing
    spin_utilization_min_pct: float = 90.0
    spin_memory_utilization_max_pct: float = 2.0
    working_memory_utilization_min_pct: float = 5.0
    idle_utilization_max_pct: float = 10.0
    # Set per machine. Where memory utilization is reported, a spin must also be at or under it;
    # where it is not, utilization high plus power at or under it is the spin. H200: spinning
    # 120-137 W, working 558-705 W, idle 77 W (so power alone cannot tell spin from idle).
    spin_power_max_w: float | None = None
    # False where NVML's memory utilization is not known to mean DRAM traffic (GB10: nobody has
    # read it there during real work); then only power can corroborate a spin.
    use_memory_utilization: bool = True
    # True only where the machine has no GPU at all (a CPU engine, the simulated engine in
    # tests): then nothing can corroborate, and a stall alone is a hang (`no_gpu_on_machine`).
    stall_without_gpu: bool = False


# GB10 (DGX Spark): CONSTRUCTED, not read on one. One deadlocked GB10 engine read ~96 % at
# 16-27 W (eugr/spark-vllm-docker 260); what GB10's utilization.memory says during real work is
# unknown, so it is not used, and 30 W is the spin ceiling. docs/watch.md says more.
GB10: Final = Thresholds(spin_power_max_w=30.0, use_memory_utilization=False)


def thresholds_for(gpu_name: str) -> Thresholds:
    """The defaults for a GPU by its NVML name: GB10's constructed ones, else the H200-read ones."""
    return GB10 if "GB10" in gpu_name else Thresholds()


@dataclass(frozen=True, slots=True)
class Evidence:
    seconds: float  # the engine window's span
    tokens_delta: float | None
    requests_running_min: float | None
    requests_running_max: float | None
    gpu_samples: int
    utilization_pct: float | None  # medians over the window's GPU samples
    memory_utilization_pct: float | None
    power_w: float | None

    def to_json(self) -> dict[str, Any]:
        return {
            "seconds": self.seconds,
            "tokens_delta": self.tokens_delta,
            "requests_running_min": self.requests_running_min,
            "requests_running_max": self.requests_running_max,
            "gpu_samples": self.gpu_samples,
            "utilization_pct": self.utilization_pct,
            "memory_utilization_pct": self.memory_utilization_pct,
            "power_w": self.power_w,
        }


@dataclass(frozen=True, slots=True)
class Verdict:
    state: State
    reasons: tuple[Reason, ...]
    evidence: Evidence

    def to_json(self) -> dict[str, Any]:
        return {
            "state": self.state.value,
            "reasons": [r.value for r in self.reasons],
            "evidence": self.evidence.to_json(),
        }


def _median(values: Iterable[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def assess(engine: Sequence[EngineSample], gpu: Sequence[GpuSample],
           limits: Thresholds = Thresholds()) -> Verdict:
    """One window's verdict (see the module's table). `engine` in time order."""
    counters = [s.generated_tokens for s in engine]
    running = [s.requests_running for s in engine]
    present_running = [r for r in running if r is not None]
    delta = (counters[-1] - counters[0]
             if len(engine) >= 2 and counters[0] is not None and counters[-1] is not None
             else None)
    evidence = Evidence(
        seconds=engine[-1].t - engine[0].t if engine else 0.0,
        tokens_delta=delta,
        requests_running_min=min(present_running) if present_running else None,
        requests_running_max=max(present_running) if present_running else None,
        gpu_samples=len(gpu),
        utilization_pct=_median(s.utilization_pct for s in gpu),
        memory_utilization_pct=_median(s.memory_utilization_pct for s in gpu),
        power_w=_median(s.power_w for s in gpu),
    )

    def verdict(state: State, *reasons: Reason) -> Verdict:
        return Verdict(state, reasons, evidence)

    if len(engine) < 2:
        return verdict(State.UNKNOWN, Reason.TOO_FEW_SAMPLES)
    known = [c for c in counters if c is not None]
    if len(known) != len(counters):
        return verdict(State.UNKNOWN, Reason.NO_TOKEN_COUNTER)
    if any(b < a for a, b in itertools.pairwise(known)):
        return verdict(State.UNKNOWN, Reason.COUNTER_RESET)
    if known[-1] > known[0]:
        return verdict(State.BUSY, Reason.TOKENS_MOVING)
    if len(present_running) != len(running):
        return verdict(State.UNKNOWN, Reason.NO_REQUEST_GAUGE)
    if max(present_running) <= 0:
        return verdict(State.IDLE, Reason.NO_REQUESTS)
    if min(present_running) <= 0:
        return verdict(State.UNKNOWN, Reason.REQUESTS_NOT_STEADY)
    if evidence.seconds < limits.min_window_s:
        return verdict(State.UNKNOWN, Reason.WINDOW_TOO_SHORT)
    return _stalled(evidence, limits)


def _stalled(ev: Evidence, limits: Thresholds) -> Verdict:
    """Requests ran all window long and no token came out: what was the GPU doing?"""
    stall = Reason.TOKENS_STALLED

    def verdict(state: State, *reasons: Reason) -> Verdict:
        return Verdict(state, (stall, *reasons), ev)

    util, power = ev.utilization_pct, ev.power_w
    mem = ev.memory_utilization_pct if limits.use_memory_utilization else None
    if util is None:
        if limits.stall_without_gpu and ev.gpu_samples == 0:
            return verdict(State.HUNG, Reason.NO_GPU_ON_MACHINE)
        return verdict(State.UNKNOWN, Reason.NO_GPU_READING)
    if util <= limits.idle_utilization_max_pct:
        return verdict(State.UNKNOWN, Reason.GPU_IDLE)
    if mem is not None and mem >= limits.working_memory_utilization_min_pct:
        return verdict(State.BUSY, Reason.GPU_WORKING)
    if util < limits.spin_utilization_min_pct:
        return verdict(State.UNKNOWN, Reason.GPU_AMBIGUOUS)
    power_says_spin = (None if limits.spin_power_max_w is None or power is None
                       else power <= limits.spin_power_max_w)
    if mem is None:
        if power_says_spin:
            return verdict(State.HUNG, Reason.GPU_SPINNING_BY_POWER)
        if power_says_spin is None:
            return verdict(State.UNKNOWN, Reason.NO_MEMORY_UTILIZATION)
        return verdict(State.UNKNOWN, Reason.NO_MEMORY_UTILIZATION,
                       Reason.POWER_TOO_HIGH_FOR_SPIN)
    if mem > limits.spin_memory_utilization_max_pct:
        return verdict(State.UNKNOWN, Reason.GPU_AMBIGUOUS)
    if power_says_spin is False:
        return verdict(State.UNKNOWN, Reason.POWER_TOO_HIGH_FOR_SPIN)
    return verdict(State.HUNG, Reason.GPU_SPINNING)


# -- three strikes -------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Strikes:
    count: int = 0
    limit: int = 3
    restart: bool = False  # this verdict was the last strike: restart the engine now


def strike(strikes: Strikes, verdict: Verdict) -> Strikes:
    """The next state after one window's verdict (the diagram in the module's docstring)."""
    if verdict.state is State.HUNG:
        count = strikes.count + 1
        if count >= strikes.limit:
            return replace(strikes, count=0, restart=True)
        return replace(strikes, count=count, restart=False)
    if verdict.state in (State.BUSY, State.IDLE):
        return replace(strikes, count=0, restart=False)
    return replace(strikes, restart=False)


# -- engines' /metrics ---------------------------------------------------------------------

# engine kind: (generated-token counter, requests-running gauge), as the samples are named in
# the Prometheus text. vLLM: vllm/v1/metrics/loggers.py (commit 005a810b) registers the counter
# `vllm:generation_tokens` (exported with `_total`) and the gauge `vllm:num_requests_running`,
# one series per engine index. SGLang (needs --enable-metrics): docs/references/
# production_metrics.md lists `sglang:generation_tokens_total` and `sglang:num_running_reqs`.
# llama.cpp's llama-server (needs --metrics): `llamacpp:tokens_predicted_total` and
# `llamacpp:requests_processing` (tools/server README; commit a2df278, PR 11512).
METRICS: Final[dict[str, tuple[str, str]]] = {
    "vllm": ("vllm:generation_tokens_total", "vllm:num_requests_running"),
    "sglang": ("sglang:generation_tokens_total", "sglang:num_running_reqs"),
    "llamacpp": ("llamacpp:tokens_predicted_total", "llamacpp:requests_processing"),
    # The simulated engine exports vLLM's two series (sparkd/sim/engine.py).
    "sim": ("vllm:generation_tokens_total", "vllm:num_requests_running"),
}


def engine_sample(engine: str, text: str, t: float) -> EngineSample:
    """An engine's /metrics text as a sample: each metric summed over its series (one per
    engine index in vLLM's data-parallel mode). An engine kind without such metrics
    (external), a metric the text lacks, or text that does not parse gives None there, which
    `assess` reports as unknown rather than as zero."""
    names = METRICS.get(engine)
    if names is None:
        return EngineSample(t, None, None)
    counter, gauge = names
    sums: dict[str, float] = {}
    try:
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name in names:
                    sums[sample.name] = sums.get(sample.name, 0.0) + float(sample.value)
    except ValueError:
        return EngineSample(t, None, None)
    return EngineSample(t, sums.get(counter), sums.get(gauge))
