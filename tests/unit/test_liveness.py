"""The liveness rule against NVML time series captured on an H200 (tests/fixtures/nvml/h200-*.json,
scripts/capture_nvml_cases.py): a spinning kernel (an imitation of a deadlocked collective) must
read as hung, and real compute, a memory-bound decode loop and an idle GPU must not.

What is real here: every GPU sample (replayed through sparkd's own NVML reader), and each
workload's own work counter (`progress`). What is constructed: the engine side. No engine ran on
the H200, so the requests-running gauge is set by hand (one request in flight while a workload
ran, none when idle), and the "same stall" tests pair one flat token counter with every case's
GPU series. docs/watch.md says the same.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import pytest

from sparkd.monitor.liveness import (
    EngineSample,
    GpuSample,
    Reason,
    State,
    Strikes,
    Thresholds,
    Verdict,
    assess,
    engine_sample,
    strike,
    thresholds_for,
)
from sparkd.monitor.nvml import FixtureNvml, read

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"
WORKING = ("decode", "matmul")
SPINNING = ("spin", "spin-few")
IDLE = ("idle-cold", "idle-warm")
CASES = WORKING + SPINNING + IDLE


@cache
def fixture(case: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / f"h200-{case}.json").read_text())
    return doc


def gpu_series(case: str) -> list[GpuSample]:
    """Each captured sample through sparkd's NVML reader, as the daemon's watch feeds them."""
    out = []
    for sample in fixture(case)["samples"]:
        (gpu,) = read(FixtureNvml(sample["captured"])).gpus
        out.append(GpuSample(sample["t"], gpu.utilization_pct, gpu.memory_utilization_pct,
                             gpu.power_w))
    return out


def own_counter(case: str) -> list[EngineSample]:
    """The workload's real work counter; requests running: constructed (1 while it ran)."""
    return [EngineSample(s["t"], s["progress"] or 0, 0 if s["progress"] is None else 1)
            for s in fixture(case)["samples"]]


def stalled(case: str) -> list[EngineSample]:
    """Constructed: one request running, the token counter flat, at the fixture's times."""
    return [EngineSample(s["t"], 1234, 1) for s in fixture(case)["samples"]]


def test_the_fixtures_are_what_they_say() -> None:
    for case in CASES:
        doc = fixture(case)
        assert doc["gpu"]["name"] == "NVIDIA H200" and doc["interval_s"] == 0.5
        assert len(doc["samples"]) >= 40
        assert (doc["workload"] is None) == (case in IDLE)
    assert fixture("spin")["workload"]["code"] == fixture("spin-few")["workload"]["code"]
    assert "globaltimer" in fixture("spin")["workload"]["code"]


@pytest.mark.parametrize("case", CASES)
def test_each_case_with_its_own_counter(case: str) -> None:
    verdict = assess(own_counter(case), gpu_series(case))
    expected = {
        "decode": (State.BUSY, (Reason.TOKENS_MOVING,)),
        "matmul": (State.BUSY, (Reason.TOKENS_MOVING,)),
        "spin": (State.HUNG, (Reason.TOKENS_STALLED, Reason.GPU_SPINNING)),
        "spin-few": (State.HUNG, (Reason.TOKENS_STALLED, Reason.GPU_SPINNING)),
        "idle-cold": (State.IDLE, (Reason.NO_REQUESTS,)),
        "idle-warm": (State.IDLE, (Reason.NO_REQUESTS,)),
    }[case]
    assert (verdict.state, verdict.reasons) == expected, verdict.to_json()


@pytest.mark.parametrize("case", CASES)
def test_the_same_stall_is_hung_only_over_a_spinning_gpu(case: str) -> None:
    verdict = assess(stalled(case), gpu_series(case))
    assert verdict.evidence.tokens_delta == 0 and verdict.evidence.requests_running_min == 1
    assert verdict.reasons[0] is Reason.TOKENS_STALLED
    if case in SPINNING:
        assert verdict.state is State.HUNG and verdict.reasons[1] is Reason.GPU_SPINNING
    elif case in WORKING:  # a long prefill looks like this: tokens flat, memory moving
        assert verdict.state is State.BUSY and verdict.reasons[1] is Reason.GPU_WORKING
    else:
        assert verdict.state is State.UNKNOWN and verdict.reasons[1] is Reason.GPU_IDLE


def test_the_numbers_behind_the_verdicts() -> None:
    """The medians docs/watch.md quotes, read back from the fixtures."""
    def medians(case: str) -> tuple[float | None, float | None, float | None]:
        ev = assess(stalled(case), gpu_series(case)).evidence
        return ev.utilization_pct, ev.memory_utilization_pct, ev.power_w

    spin, few, matmul, decode = (medians(c) for c in ("spin", "spin-few", "matmul", "decode"))
    assert spin[:2] == few[:2] == (100, 0)
    assert matmul[0] is not None and matmul[0] >= 99 and matmul[1] == 24
    assert decode[:2] == (100, 99)
    powers = {c: medians(c)[2] or 0.0 for c in CASES}
    assert max(powers[c] for c in SPINNING) < 150 < 500 < min(powers[c] for c in WORKING)
    assert max(powers[c] for c in IDLE) < 80  # a spin draws more than idle, far less than work


def windows(case: str, seconds: float) -> list[tuple[list[EngineSample], list[GpuSample]]]:
    """The fixture cut into consecutive windows of `seconds` (samples at both edges shared)."""
    engine, gpu = own_counter(case), gpu_series(case)
    out, start = [], 0.0
    while start + seconds <= engine[-1].t:
        def inside(t: float, lo: float = start) -> bool:
            return lo <= t <= lo + seconds
        out.append(([e for e in engine if inside(e.t)], [g for g in gpu if inside(g.t)]))
        start += seconds
    return out


def run_strikes(verdicts: list[Verdict]) -> list[Strikes]:
    states, current = [], Strikes()
    for verdict in verdicts:
        current = strike(current, verdict)
        states.append(current)
    return states


def test_a_spinning_engine_is_restarted_on_the_third_window() -> None:
    limits = Thresholds(min_window_s=6.0)
    verdicts = [assess(e, g, limits) for e, g in windows("spin", 6.0)]
    assert [v.state for v in verdicts] == [State.HUNG] * 3
    assert [(s.count, s.restart) for s in run_strikes(verdicts)] == [
        (1, False), (2, False), (0, True)]


@pytest.mark.parametrize("case", WORKING + IDLE)
def test_working_or_idle_engines_are_never_struck(case: str) -> None:
    limits = Thresholds(min_window_s=6.0)
    verdicts = [assess(e, g, limits) for e, g in windows(case, 6.0)]
    assert len(verdicts) == 3
    assert all(not s.restart and s.count == 0 for s in run_strikes(verdicts))


def _verdict(state: State) -> Verdict:
    return assess([EngineSample(0, 1, 1), EngineSample(1, 2, 1)], []) if state is State.BUSY \
        else Verdict(state, (), assess([], []).evidence)


def test_strikes_reset_on_busy_or_idle_and_hold_on_unknown() -> None:
    hung, busy, idle, unknown = (_verdict(s) for s in State.__members__.values())
    assert busy.state is State.BUSY
    seq = [busy, unknown, idle, hung, hung, busy, hung, unknown, hung, idle, hung, hung, unknown,
           unknown, hung, hung]
    got = [(s.count, s.restart) for s in run_strikes(seq)]
    assert got == [(0, False), (0, False), (0, False), (1, False), (2, False), (0, False),
                   (1, False), (1, False), (2, False), (0, False), (1, False), (2, False),
                   (2, False), (2, False), (0, True), (1, False)]
    assert [s.count for s in run_strikes([hung] * 7)] == [1, 2, 0, 1, 2, 0, 1]
    assert run_strikes([hung])[0].limit == 3 and strike(Strikes(limit=1), hung).restart


def test_what_the_rule_will_not_call() -> None:
    gpu = gpu_series("spin")
    run = [EngineSample(t, 50, 1) for t in (0, 5, 10, 15)]
    cases: list[tuple[list[EngineSample], Reason]] = [
        ([], Reason.TOO_FEW_SAMPLES),
        (run[:1], Reason.TOO_FEW_SAMPLES),
        ([*run[:2], EngineSample(10, None, 1), run[3]], Reason.NO_TOKEN_COUNTER),
        ([*run[:2], EngineSample(10, 3, 1), EngineSample(15, 3, 1)], Reason.COUNTER_RESET),
        ([*run[:2], EngineSample(10, 50, None), run[3]], Reason.NO_REQUEST_GAUGE),
        ([*run[:2], EngineSample(10, 50, 0), run[3]], Reason.REQUESTS_NOT_STEADY),
        (run[:2], Reason.WINDOW_TOO_SHORT),
    ]
    for engine, reason in cases:
        verdict = assess(engine, gpu)
        assert (verdict.state, verdict.reasons) == (State.UNKNOWN, (reason,)), (engine, verdict)
    no_gpu = assess(run, [])
    assert (no_gpu.state, no_gpu.reasons) == (
        State.UNKNOWN, (Reason.TOKENS_STALLED, Reason.NO_GPU_READING))
    # tokens that moved at any point in the window are life, however the GPU looks
    moved = assess([EngineSample(0, 50, 1), EngineSample(5, 50, 1), EngineSample(10, 51, 1)], gpu)
    assert moved.state is State.BUSY


def test_between_the_thresholds_is_unknown() -> None:
    run = [EngineSample(t, 50, 1) for t in (0, 15)]
    for util, mem in ((50.0, 0.0), (100.0, 3.0)):
        verdict = assess(run, [GpuSample(0, util, mem, 200.0)])
        assert verdict.state is State.UNKNOWN and verdict.reasons[1] is Reason.GPU_AMBIGUOUS


def test_power_when_set_must_agree_with_a_spin() -> None:
    gpu = gpu_series("spin")
    assert assess(stalled("spin"), gpu, Thresholds(spin_power_max_w=300)).state is State.HUNG
    low = assess(stalled("spin"), gpu, Thresholds(spin_power_max_w=100))  # spin read 137 W
    assert (low.state, low.reasons[1]) == (State.UNKNOWN, Reason.POWER_TOO_HIGH_FOR_SPIN)


def gb10_shaped(util: float, power: float) -> list[GpuSample]:
    """CONSTRUCTED, not read: a GB10 whose NVML reports no memory utilization, at the ~96 % and
    16-27 W one deadlocked GB10 read (eugr/spark-vllm-docker 260). Whether GB10's NVML reports
    utilization.memory at all is not known here; this is the rule's path for when it does not."""
    return [GpuSample(t / 2, util, None, power + (t % 3)) for t in range(40)]


def test_without_memory_utilization_power_decides_only_when_configured() -> None:
    engine = [EngineSample(t / 2, 1234, 1) for t in range(40)]
    gpu = gb10_shaped(96, 18)
    unset = assess(engine, gpu)
    assert (unset.state, unset.reasons[1]) == (State.UNKNOWN, Reason.NO_MEMORY_UTILIZATION)
    hung = assess(engine, gpu, Thresholds(spin_power_max_w=30))
    assert (hung.state, hung.reasons[1]) == (State.HUNG, Reason.GPU_SPINNING_BY_POWER)
    hot = assess(engine, gb10_shaped(96, 60), Thresholds(spin_power_max_w=30))
    assert hot.state is State.UNKNOWN and Reason.POWER_TOO_HIGH_FOR_SPIN in hot.reasons


def test_gb10_ignores_memory_utilization_and_asks_power() -> None:
    """CONSTRUCTED: tests/fixtures/nvml/gb10-constructed.json reports utilization.memory 0 at
    87 % (illustrative values). With the default (H200) thresholds a stalled engine over such a
    GPU is hung whatever its power; with GB10's it is hung only at a deadlock's power."""
    captured = json.loads((FIXTURES / "gb10-constructed.json").read_text())["captured"]
    nvml = FixtureNvml(captured)
    (gpu,) = read(nvml).gpus
    rates = nvml.nvmlDeviceGetUtilizationRates(0)
    assert (gpu.name, rates.memory) == ("NVIDIA GB10", 0)
    limits = thresholds_for(gpu.name)
    assert not limits.use_memory_utilization and thresholds_for("NVIDIA H200") == Thresholds()
    engine = [EngineSample(t, 1234, 1) for t in (0, 10, 20)]

    def at(util: float, power: float) -> list[GpuSample]:
        return [GpuSample(t, util, rates.memory, power) for t in (0, 10, 20)]

    assert gpu.power_w is not None and gpu.power_w > 30  # the fixture's 48 W: working, say
    assert assess(engine, at(96, gpu.power_w)).state is State.HUNG  # H200 rule: fooled
    working = assess(engine, at(96, gpu.power_w), limits)
    assert (working.state, working.reasons) == (State.UNKNOWN, (
        Reason.TOKENS_STALLED, Reason.NO_MEMORY_UTILIZATION, Reason.POWER_TOO_HIGH_FOR_SPIN))
    deadlocked = assess(engine, at(96, 22), limits)
    assert (deadlocked.state, deadlocked.reasons[1]) == (State.HUNG, Reason.GPU_SPINNING_BY_POWER)
    assert deadlocked.evidence.memory_utilization_pct == 0  # read, reported, not used


def test_verdict_to_json_is_plain_data() -> None:
    doc = assess(stalled("spin"), gpu_series("spin")).to_json()
    assert json.loads(json.dumps(doc)) == doc
    assert doc["state"] == "hung" and doc["reasons"] == ["tokens_stalled", "gpu_spinning"]
    assert doc["evidence"]["memory_utilization_pct"] == 0


# The exposition lines below follow what each engine's upstream shows (see METRICS in
# sparkd/monitor/liveness.py for where): vLLM labels each series with model_name and engine.
VLLM = """\
# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 1.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="m"} 1500.0
vllm:generation_tokens_total{engine="1",model_name="m"} 500.0
# HELP vllm:generation_tokens_created Number of generation tokens processed.
# TYPE vllm:generation_tokens_created gauge
vllm:generation_tokens_created{engine="0",model_name="m"} 1.7e+09
"""
SGLANG = """\
# HELP sglang:generation_tokens_total Number of generation tokens processed.
# TYPE sglang:generation_tokens_total counter
sglang:generation_tokens_total{model_name="meta-llama/Llama-3.1-8B-Instruct"} 7.557572e+06
# HELP sglang:num_running_reqs The number of running requests
# TYPE sglang:num_running_reqs gauge
sglang:num_running_reqs{model_name="meta-llama/Llama-3.1-8B-Instruct"} 162.0
"""
LLAMACPP = """\
# HELP llamacpp:tokens_predicted_total Number of generation tokens processed.
# TYPE llamacpp:tokens_predicted_total counter
llamacpp:tokens_predicted_total 3469
# HELP llamacpp:requests_processing Number of requests processing.
# TYPE llamacpp:requests_processing gauge
llamacpp:requests_processing 0
"""


def test_engine_metrics_are_read_and_summed_over_series() -> None:
    assert engine_sample("vllm", VLLM, 1.0) == EngineSample(1.0, 2000.0, 3.0)
    assert engine_sample("sglang", SGLANG, 2.0) == EngineSample(2.0, 7557572.0, 162.0)
    assert engine_sample("llamacpp", LLAMACPP, 3.0) == EngineSample(3.0, 3469.0, 0.0)


def test_missing_or_garbled_metrics_are_none_not_zero() -> None:
    assert engine_sample("external", VLLM, 0) == EngineSample(0, None, None)
    assert engine_sample("sim", VLLM, 1.0) == EngineSample(1.0, 2000.0, 3.0)  # vLLM's names
    assert engine_sample("vllm", SGLANG, 0) == EngineSample(0, None, None)
    assert engine_sample("vllm", "vllm:generation_tokens_total{ 12\n", 0) == EngineSample(
        0, None, None)
    only_counter = "\n".join(VLLM.splitlines()[4:8]) + "\n"
    assert engine_sample("vllm", only_counter, 0) == EngineSample(0, 2000.0, None)
