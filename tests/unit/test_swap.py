"""Swap planning (pure) and the executor against a fake systemd that sends job signals."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import Any, TypeVar

import pytest
from fakes import FakeSystemd, build, started

from sparkd.config import Config, parse_config
from sparkd.daemon.supervisor import Supervisor
from sparkd.engine.fingerprints import match_lines
from sparkd.engine.plan import Snapshot, SwapStep, next_step, plan_swap
from sparkd.engine.prestart import PrestartPlan, memory_gate
from sparkd.engine.probe import ProbeResult
from sparkd.engine.swap import start_failure_reason
from sparkd.errors import SwapInProgress, SwapRefused, UnknownModel
from sparkd.monitor.memory import MemInfo, SettleRule
from sparkd.state import State, StateStore
from sparkd.systemd.manager import UnitStatus

T = TypeVar("T")
GIB = 1 << 30

CONFIG = """
[daemon]
default_model = "a"
state_dir = "{state}"
memory_reserve_gib = 1
[models.a]
engine = "sim"
port = 9001
[models.b]
engine = "sim"
port = 9002
load_timeout_s = 5
[models.crash]
engine = "sim"
port = 9003
[models.huge]
engine = "sim"
port = 9004
memory_gib = 100
[models.real]
engine = "vllm"
port = 9005
path = "/nonexistent/weights"
[models.ext]
engine = "external"
url = "http://10.0.0.9:8000"
"""


def unit(name: str, active: str = "inactive", sub: str = "dead", pid: int = 0) -> UnitStatus:
    return UnitStatus(f"sparkd-engine@{name}.service", "loaded", active, sub, pid)


def config(tmp_path: Path) -> Config:
    path = tmp_path / "sparkd.toml"
    path.write_text(CONFIG.format(state=tmp_path / "state"))
    return parse_config(path.read_text(), source=path)


def snap(**units: UnitStatus) -> Snapshot:
    return Snapshot(mem_total=16 * GIB, mem_available=12 * GIB, units=units,
                    path_exists={"real": False})


# -- the state machine ----------------------------------------------------------------------

def test_every_transition_of_the_swap_state_machine() -> None:
    ok = {
        SwapStep.PREFLIGHT: SwapStep.STOP,
        SwapStep.STOP: SwapStep.START,
        SwapStep.START: SwapStep.HEALTH_GATE,
        SwapStep.HEALTH_GATE: SwapStep.FLIP,
        SwapStep.FLIP: SwapStep.DONE,
        SwapStep.ROLLBACK: SwapStep.ROLLED_BACK,
    }
    fail = {
        SwapStep.PREFLIGHT: SwapStep.REFUSED,
        SwapStep.STOP: SwapStep.ROLLBACK,
        SwapStep.START: SwapStep.ROLLBACK,
        SwapStep.HEALTH_GATE: SwapStep.ROLLBACK,
        SwapStep.FLIP: SwapStep.ROLLBACK,
        SwapStep.ROLLBACK: SwapStep.ROLLBACK_FAILED,
    }
    for step in SwapStep:
        if step.terminal:
            with pytest.raises(ValueError, match="terminal"):
                next_step(step, ok=True)
            continue
        assert next_step(step, ok=True) is ok[step]
        assert next_step(step, ok=False) is fail[step]
    assert {s for s in SwapStep if s.terminal} == {
        SwapStep.DONE, SwapStep.REFUSED, SwapStep.ROLLED_BACK, SwapStep.ROLLBACK_FAILED}


# -- planning -------------------------------------------------------------------------------

def test_plan_stops_the_active_engine_and_rolls_back_to_it(tmp_path: Path) -> None:
    c = config(tmp_path)
    plan = plan_swap(c, State(desired_model="a"), "b", snap(a=unit("a", "active", "running", 5)))
    assert plan.from_model == "a"
    assert plan.stop == ("sparkd-engine@a.service",)
    assert plan.start == "sparkd-engine@b.service"
    assert plan.rollback_to == "a"
    assert plan.health_url == "http://127.0.0.1:9002/health"
    assert plan.gate_timeout_s == 5
    text = "\n".join(plan.describe())
    assert "stop sparkd-engine@a.service" in text
    assert "on failure: stop sparkd-engine@b.service, start a" in text


def test_last_good_is_the_rollback_target(tmp_path: Path) -> None:
    c = config(tmp_path)
    state = State(desired_model="a", last_good_model="crash")
    assert plan_swap(c, state, "b", snap()).rollback_to == "crash"
    # ... unless it is the target itself.
    assert plan_swap(c, State(desired_model="a", last_good_model="b"), "b",
                     snap()).rollback_to == "a"


def test_swap_to_the_serving_model_is_a_noop(tmp_path: Path) -> None:
    plan = plan_swap(config(tmp_path), State(desired_model="a"), "a",
                     snap(a=unit("a", "active", "running", 5)))
    assert plan.noop
    assert plan.describe() == ["a is already serving: nothing to do"]


@pytest.mark.parametrize(
    ("target", "error", "message"),
    [
        ("nope", UnknownModel, "unknown model 'nope'"),
        ("huge", SwapRefused, "huge needs 100 GiB + 1 GiB reserve, more than this machine's "
                              "16.0 GiB in all"),
        ("real", SwapRefused, "real: its weights are missing at /nonexistent/weights"),
        ("ext", SwapRefused, 'ext is engine = "external"'),
    ],
)
def test_preflight_refusals(tmp_path: Path, target: str, error: type[Exception],
                            message: str) -> None:
    with pytest.raises(error, match=re.escape(message)):
        plan_swap(config(tmp_path), State(desired_model="a"), target, snap())


def test_fingerprints_match_real_vllm_lines() -> None:
    lines = [
        "INFO 12-01 [modelopt.py:1200] Using FlashInfer CUTLASS kernels for "
        "ModelOptNvFp4FusedMoE.",
        "torch.OutOfMemoryError: CUDA out of memory. Tried to allocate 2.00 GiB",
        "unrelated",
    ]
    found = {m.fingerprint.id: m for m in match_lines(lines, engine="vllm")}
    assert set(found) == {"moe_backend", "cuda_oom"}
    assert found["moe_backend"].value == "CUTLASS"
    assert match_lines(["Using FlashInfer MoE backend: latency"], engine="llamacpp") == []


# -- the executor against a fake systemd -----------------------------------------------------

def journal(unit: str) -> list[str]:
    if "crash" in unit:
        return ["loading", "torch.OutOfMemoryError: CUDA out of memory (simulated)"]
    return ["Using FlashInfer MoE backend: latency"]


def make(tmp_path: Path, *, fail_start: set[str] | None = None,
         state: State | None = None) -> tuple[Supervisor, FakeSystemd]:
    if state is not None:
        StateStore(tmp_path / "state").save(state)
    w = build(tmp_path, CONFIG, systemd=FakeSystemd(fail_start=fail_start), journal=journal)
    return w.sup, w.systemd


async def swap_and_wait(sup: Supervisor, target: str) -> Any:
    run = sup.request_swap(target)
    assert run is not None
    assert sup._swap_task is not None
    return await sup._swap_task


def test_swap_a_to_b_then_back(tmp_path: Path) -> None:
    sup, fake = make(tmp_path)

    async def scenario() -> None:
        await started(sup)
        run = await swap_and_wait(sup, "b")
        assert run.step is SwapStep.DONE, run.failure
        assert [r.step for r in run.history] == [SwapStep.PREFLIGHT, SwapStep.STOP,
                                                 SwapStep.START, SwapStep.HEALTH_GATE,
                                                 SwapStep.FLIP]
        assert sup.state.desired_model == "b"
        assert sup.state.swap_to is None
        run = await swap_and_wait(sup, "a")
        assert run.step is SwapStep.DONE
        await sup.quiesce()

    asyncio.run(scenario())
    assert fake.calls == [
        ("start", "sparkd-engine@a.service"),
        ("stop", "sparkd-engine@a.service"), ("start", "sparkd-engine@b.service"),
        ("stop", "sparkd-engine@b.service"), ("start", "sparkd-engine@a.service"),
    ]
    stored, _ = StateStore(tmp_path / "state").load()
    assert stored.desired_model == "a"
    assert sup.engines["a"].fingerprints[0].value == "latency"


def test_failed_start_rolls_back_and_records_why(tmp_path: Path) -> None:
    sup, fake = make(tmp_path, fail_start={"crash"})

    async def scenario() -> Any:
        await started(sup)
        run = await swap_and_wait(sup, "crash")
        await sup.quiesce()
        return run

    run = asyncio.run(scenario())
    assert run.step is SwapStep.ROLLED_BACK
    assert run.failure.startswith("start: sparkd-engine@crash.service start job failed, "
                                  "result exit-code, exit status 1; cuda_oom:")
    assert fake.calls[-3:] == [("start", "sparkd-engine@crash.service"),
                               ("stop", "sparkd-engine@crash.service"),
                               ("start", "sparkd-engine@a.service")]
    assert sup.state.desired_model == "a"
    assert sup.state.last_failure_model == "crash"
    status = sup.status()
    assert status.last_failure is not None and status.last_failure.reason == run.failure
    assert status.last_swap is not None and status.last_swap.step == "rolled_back"


REFUSAL = ("ValueError: NvFp4 MoE backend 'FLASHINFER_TRTLLM' does not support the "
           "deployment configuration since kernel does not support current device.")
MOE_CONFIG = CONFIG + """
[models.moe]
engine = "vllm"
engine_version = "0.34.0"
port = 9006
path = "{state}"
"""


@pytest.mark.parametrize(("when", "step"), [("start_failed", "start"), ("start_done", "start"),
                                             ("after_start", "health_gate")])
def test_a_refused_moe_backend_fails_the_start_with_that_line(
    tmp_path: Path, when: str, step: str
) -> None:
    """vLLM >= 0.22 refuses a forced MoE backend it cannot run (fingerprints.MOE_REFUSED).
    Whether systemd saw the start fail or not, and whether the line reached the journal by
    the end of the start or only by the health gate, the swap fails with that line as its
    reason and rolls back."""
    (tmp_path / "state").mkdir()
    reads = {"n": 0}

    def journal(unit: str) -> list[str]:
        if "moe" not in unit:
            return []
        reads["n"] += 1
        if when == "after_start" and reads["n"] == 1:
            return ["INFO loading weights"]
        return ["Traceback (most recent call last):", REFUSAL]

    w = build(tmp_path, MOE_CONFIG, journal=journal,
              systemd=FakeSystemd(fail_start={"moe"} if when == "start_failed" else set()))

    async def scenario() -> Any:
        await started(w.sup)
        run = await swap_and_wait(w.sup, "moe")
        await w.sup.quiesce()
        return run

    run = asyncio.run(scenario())
    assert run.step is SwapStep.ROLLED_BACK
    assert run.failure.startswith(f"{step}: vLLM refused the MoE backend"), run.failure
    assert REFUSAL in run.failure and "moe_backend_refused:" not in run.failure
    assert w.sup.state.desired_model == "a"
    if when != "after_start":
        (match,) = [m for m in w.sup.engines["moe"].fingerprints
                    if m.value == "FLASHINFER_TRTLLM"]
        assert match.backend == "flashinfer_trtllm"


def test_one_swap_at_a_time(tmp_path: Path) -> None:
    sup, _ = make(tmp_path)

    async def scenario() -> None:
        await started(sup)
        sup.request_swap("b")
        with pytest.raises(SwapInProgress, match=r"swap \d+ \(a -> b\) is in progress"):
            sup.request_swap("a")
        await sup.quiesce()

    asyncio.run(scenario())


def test_refused_swap_changes_nothing(tmp_path: Path) -> None:
    sup, fake = make(tmp_path)

    async def scenario() -> None:
        await started(sup)
        before = list(fake.calls)
        with pytest.raises(SwapRefused):
            sup.request_swap("huge")
        assert fake.calls == before
        assert sup.swap_run is None
        await sup.quiesce()

    asyncio.run(scenario())


def test_swap_in_flight_is_resumed_by_the_next_sparkd(tmp_path: Path) -> None:
    left = State(desired_model="a", swap_to="b", swap_from="a", swap_step="start")
    sup, fake = make(tmp_path, state=left)

    async def scenario() -> Any:
        await started(sup)
        assert sup._swap_task is not None
        run = await sup._swap_task
        await sup.quiesce()
        return run

    run = asyncio.run(scenario())
    assert run.step is SwapStep.DONE
    assert run.reason == "resumed after a sparkd restart"
    assert sup.state.desired_model == "b" and sup.state.swap_to is None
    assert ("start", "sparkd-engine@b.service") in fake.calls


def test_crash_loop_rolls_back_to_the_last_good_model(tmp_path: Path) -> None:
    sup, fake = make(tmp_path, state=State(desired_model="b", last_good_model="a"))

    async def scenario() -> None:
        await started(sup)
        name = "sparkd-engine@b.service"
        fake.units[name] = UnitStatus(name, "loaded", "failed", "failed", 0, 4, "start-limit-hit")
        await sup.refresh_units(["b"])
        await sup.quiesce()

    asyncio.run(scenario())
    assert ("reset-failed", "sparkd-engine@b.service") in fake.calls
    assert fake.calls[-1] == ("start", "sparkd-engine@a.service")
    assert sup.state.desired_model == "a"
    assert sup.state.last_failure_reason == (
        "crash loop: systemd gave up after 4 restarts (result start-limit-hit)")


def test_hung_engine_is_restarted_after_n_failed_checks(tmp_path: Path) -> None:
    sup, fake = make(tmp_path)
    statuses = iter([200, 503, 503, 503, 200])

    async def probe(url: str) -> ProbeResult:
        return ProbeResult(url=url, status=next(statuses), error=None, latency_s=0.001)

    sup.deps.probe = probe

    async def scenario() -> None:
        await started(sup)
        for _ in range(4):
            await sup.check_health()
        await sup.quiesce()

    asyncio.run(scenario())
    assert fake.calls.count(("restart", "sparkd-engine@a.service")) == 1


def test_last_good_after_staying_healthy(tmp_path: Path) -> None:
    sup, _ = make(tmp_path)
    now = [1000.0]
    sup.deps.clock = lambda: now[0]

    async def scenario() -> None:
        await started(sup)
        await sup.check_health()
        assert sup.state.last_good_model is None
        now[0] += 61
        await sup.check_health()
        await sup.quiesce()

    asyncio.run(scenario())
    assert sup.state.last_good_model == "a"


SPEC = CONFIG + """
[models.s]
engine = "sim"
port = 9010
memory_gib = 2
[models.s.speculative]
method = "eagle3"
draft_model = "/models/draft"
memory_gib = {spec_gib}
"""


def test_speculative_variant_starts_beside_the_plain_one_when_memory_allows(
    tmp_path: Path,
) -> None:
    w = build(tmp_path, SPEC.replace("{spec_gib}", "3"))

    async def scenario() -> None:
        await started(w.sup)
        await swap_and_wait(w.sup, "s")
        await w.sup.quiesce()

    asyncio.run(scenario())
    assert w.systemd.calls[-2:] == [("start", "sparkd-engine@s.service"),
                                    ("start", "sparkd-engine@s:spec.service")]
    engines = {(e.model, e.variant): e for e in w.sup.status().engines}
    assert engines[("s", "speculative")].port == 9011
    assert engines[("s", "speculative")].active_state == "active"
    assert engines[("s", "speculative")].note is None
    assert w.sup.active_model() == "s"


def test_speculative_variant_skipped_when_memory_does_not_allow_and_status_says_why(
    tmp_path: Path,
) -> None:
    w = build(tmp_path, SPEC.replace("{spec_gib}", "50"))

    async def scenario() -> None:
        await started(w.sup)
        await swap_and_wait(w.sup, "s")
        await w.sup.quiesce()

    asyncio.run(scenario())
    assert ("start", "sparkd-engine@s:spec.service") not in w.systemd.calls
    spec = next(e for e in w.sup.status().engines if e.variant == "speculative")
    assert spec.note == ("not started: needs 51 GiB with the reserve, 12.0 GiB available; "
                            "every call goes to the plain engine")


def test_a_swap_away_stops_both_variants(tmp_path: Path) -> None:
    c = parse_config(SPEC.replace("{spec_gib}", "3").format(state=tmp_path),
                     source=tmp_path / "x.toml")
    running = {"s": unit("s", "active", "running", 5),
               "s:spec": UnitStatus("sparkd-engine@s:spec.service", "loaded", "active",
                                    "running", 6)}
    plan = plan_swap(c, State(desired_model="s"), "a", snap(**running))
    assert plan.stop == ("sparkd-engine@s.service", "sparkd-engine@s:spec.service")
    # ... and a swap to the serving model leaves its speculative variant alone.
    assert plan_swap(c, State(desired_model="s"), "s", snap(**running)).noop


def test_a_bad_file_refuses_the_swap_while_the_old_model_keeps_serving(tmp_path: Path) -> None:
    from sparkd.errors import VerificationFailed

    sup, fake = make(tmp_path)

    async def bad_files(config: Any, model: Any) -> Any:
        raise VerificationFailed(f"model {model.name}: 1 file(s) failed verification: "
                                 "model-00002.safetensors: BAD (sha256 mismatch)")

    async def scenario() -> Any:
        await started(sup)
        sup.deps.verify_files = bad_files
        calls = list(fake.calls)
        run = await swap_and_wait(sup, "b")
        await sup.quiesce()
        assert fake.calls == calls  # nothing stopped, nothing started
        return run

    run = asyncio.run(scenario())
    assert run.step is SwapStep.REFUSED
    assert run.failure == ("preflight: VerificationFailed: model b: 1 file(s) failed "
                           "verification: model-00002.safetensors: BAD (sha256 mismatch)")
    assert sup.state.desired_model == "a"
    assert sup.active_model() == "a"
    assert sup.state.last_failure_model == "b"


def test_a_failed_start_says_its_real_reason_first(tmp_path: Path) -> None:
    """The memory gate's refusal (the line prestart really writes) leads the failure, ahead of
    the job result and the journal's tail."""
    plan = PrestartPlan(model="crash", model_path=tmp_path, memory_gib=70, reserve_gib=4,
                        settle=SettleRule())
    refusal = memory_gate(plan, MemInfo(total=128 * GIB, free=GIB, available=60 * GIB,
                                         cached=GIB)).line
    lines = ["prestart crash: sync: 1 ms", *(f"noise {i}" for i in range(15)), refusal]
    w = build(tmp_path, CONFIG, systemd=FakeSystemd(fail_start={"crash"}),
              journal=lambda unit: lines if "crash" in unit else [])

    async def scenario() -> Any:
        await started(w.sup)
        return await swap_and_wait(w.sup, "crash")

    run = asyncio.run(scenario())
    assert run.failure == (
        "start: prestart crash: refused: needs 70.0 GiB + 4.0 GiB reserve, 60.0 GiB available"
        " (stop other GPU work or lower memory_gib) (sparkd-engine@crash.service start job "
        "failed, result exit-code, exit status 1); last lines: " + " | ".join(lines[-12:]))
    assert start_failure_reason(["wait-healthy: http://x/health: not healthy after 900.0 s "
                                 "(4500 probes, timeout 900 s): last HTTP 503"]) == (
        "wait-healthy: http://x/health: not healthy after 900.0 s (4500 probes, timeout "
        "900 s): last HTTP 503")
    assert start_failure_reason(["nothing telling"]) is None


def test_the_plan_says_when_the_target_would_not_fit_now(tmp_path: Path) -> None:
    c = parse_config(CONFIG.format(state=tmp_path).replace(
        "memory_gib = 100", "memory_gib = 14"), source=tmp_path / "x.toml")
    a = unit("a", "active", "running", 7)
    tight = Snapshot(mem_total=16 * GIB, mem_available=8 * GIB, units={"a": a},
                     path_exists={})
    plan = plan_swap(c, State(desired_model="a"), "huge", tight)
    assert plan.fit_note == (
        "huge would not fit now: it needs 14 GiB + 1 GiB reserve, about 8.0 GiB would be "
        "available once sparkd-engine@a.service stop; prestart's memory gate would refuse the "
        "start and the swap would roll back (stop other work on the machine first)")
    assert plan.describe()[1] == f"warning: {plan.fit_note}"
    roomy = Snapshot(mem_total=16 * GIB, mem_available=15 * GIB, units={"a": a},
                     path_exists={})
    assert plan_swap(c, State(desired_model="a"), "huge", roomy).fit_note is None
