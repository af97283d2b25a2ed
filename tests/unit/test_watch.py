"""The watch inside the Supervisor, over a fake systemd: the memory floor stops the engine that
grows; liveness restarts an engine whose tokens stop while /health answers 200."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from fakes import World, build, run, started

from sparkd.engine.probe import ProbeResult
from sparkd.monitor.floor import GIB
from sparkd.monitor.nvml import FixtureNvml, NvmlSnapshot, read
from sparkd.state import StateStore

CONFIG = """
[daemon]
default_model = "a"
state_dir = "{state}"
memory_floor_gib = {floor}
memory_floor_samples = 2
liveness_window_s = 10
{extra}
[models.a]
engine = "sim"
port = 9001
[models.b]
engine = "vllm"
port = 9002
path = "/m/b"
memory_gib = 1
"""
A, B = "sparkd-engine@a.service", "sparkd-engine@b.service"
NVML = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def world(tmp_path: Path, extra: str = "", floor: str = "4") -> tuple[World, Clock]:
    w = build(tmp_path, CONFIG.replace("{extra}", extra).replace("{floor}", floor))
    clock = Clock()
    w.sup.deps.clock = clock
    return w, clock


def test_the_floor_stops_the_engine_that_grows(tmp_path: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    w, clock = world(tmp_path)
    w.systemd.set("a", "active", "running", pid=41)
    w.systemd.set("b", "active", "running", pid=42)
    memory = {41: 30 * GIB, 42: 10 * GIB}
    available = [20 * GIB]
    w.sup.watch.engine_memory = memory.get
    w.sup.watch.read_available = lambda: available[0]

    async def scenario() -> None:
        await started(w.sup)
        await w.sup.check_health()  # baselines: a 30 GiB, b 10 GiB
        await w.sup.watch.floor_sample(w.sup)
        memory[42] = 25 * GIB  # b grows by 15 GiB; a stays the biggest
        available[0] = 3 * GIB
        clock.t += 0.1
        await w.sup.watch.floor_sample(w.sup)  # one reading under: not yet
        assert ("stop", B) not in w.systemd.calls
        clock.t += 0.1
        await w.sup.watch.floor_sample(w.sup)  # the second: trips
        await w.sup.quiesce()
        clock.t += 0.1
        await w.sup.watch.floor_sample(w.sup)  # still under, b stopping/stopped: a stays
        await w.sup.quiesce()

    with caplog.at_level(logging.INFO):
        run(scenario())
    assert [c for c in w.systemd.calls if c[0] == "stop"] == [("stop", B)]
    assert w.systemd.units[B].active_state == "inactive"
    floor = [r.getMessage() for r in caplog.records if "memory floor:" in r.getMessage()]
    assert floor == ["memory floor: MemAvailable 3.0 GiB under the floor of 4.0 GiB for 2 "
                     "readings (0.10 s); stopping b, which holds 25.0 GiB (15.0 GiB more than "
                     "0.2 s before; grew most) before the host wedges"]
    state, _ = StateStore(tmp_path / "state").load()
    assert state.last_failure_model == "b"
    assert "memory floor" in (state.last_failure_reason or "")
    assert any("stopped (job done)" in r.getMessage() for r in caplog.records)


def test_under_the_floor_with_no_engine_to_stop_is_said_once_per_run_under_it(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The floor tripped and nothing of sparkd's held the memory: that was silent (the second
    review of issue 13); now one event per run under the floor, not one per trip."""
    w, clock = world(tmp_path)
    w.systemd.set("a", "active", "running", pid=41)
    w.sup.watch.engine_memory = lambda pid: None  # no memory.current, no resident set
    available = [1 * GIB]
    w.sup.watch.read_available = lambda: available[0]

    async def scenario() -> None:
        await started(w.sup)
        for value in [1 * GIB] * 6 + [20 * GIB] + [1 * GIB] * 2:
            available[0] = value
            clock.t += 0.1
            await w.sup.watch.floor_sample(w.sup)
        await w.sup.quiesce()

    with caplog.at_level(logging.INFO):
        run(scenario())
    said = [r.getMessage() for r in caplog.records if "no engine of sparkd's" in r.getMessage()]
    assert said == ["memory floor: MemAvailable 1.0 GiB under the floor of 4.0 GiB, and no "
                    "engine of sparkd's to stop: 1 running, none whose memory could be read "
                    "(sparkd cannot tell which one holds it)"] * 2
    assert not any(c[0] == "stop" for c in w.systemd.calls)


def test_a_zero_floor_stops_nothing(tmp_path: Path) -> None:
    w, _ = world(tmp_path, floor="0")
    w.systemd.set("a", "active", "running", pid=41)
    w.sup.watch.engine_memory = {41: 30 * GIB}.get
    w.sup.watch.read_available = lambda: 0

    async def scenario() -> None:
        await started(w.sup)
        for _ in range(5):
            await w.sup.watch.floor_sample(w.sup)
        await w.sup.quiesce()

    run(scenario())
    assert w.systemd.calls == []


def metrics(tokens: float, running: float) -> str:
    return ("# TYPE vllm:num_requests_running gauge\n"
            f'vllm:num_requests_running{{engine="0"}} {running}\n'
            "# TYPE vllm:generation_tokens_total counter\n"
            f'vllm:generation_tokens_total{{engine="0"}} {tokens}\n')


def spin_snapshot() -> NvmlSnapshot:
    """The H200 reading of every SM polling a flag nobody sets (a deadlock's look)."""
    doc = json.loads((NVML / "h200-spin.json").read_text())
    return read(FixtureNvml(doc["samples"][len(doc["samples"]) // 2]["captured"]))


def decode_snapshot() -> NvmlSnapshot:
    doc = json.loads((NVML / "h200-decode.json").read_text())
    return read(FixtureNvml(doc["samples"][len(doc["samples"]) // 2]["captured"]))


def live_world(tmp_path: Path, snapshot: NvmlSnapshot | None,
               extra: str = "") -> tuple[World, Clock, dict[str, str]]:
    w, clock = world(tmp_path, extra)
    w.systemd.set("a", "active", "running", pid=41)
    pages = {"http://127.0.0.1:9001/metrics": metrics(500, 2)}

    async def scrape(url: str) -> str | None:
        return pages.get(url)

    async def gpu() -> NvmlSnapshot:
        assert snapshot is not None
        return snapshot

    w.sup.watch.scrape = scrape
    w.sup.watch.read_gpu = gpu if snapshot is not None else None
    return w, clock, pages


def health_ticks(w: World, clock: Clock, n: int, step: float = 5.0) -> None:
    async def scenario() -> None:
        await started(w.sup)
        for _ in range(n):
            clock.t += step
            await w.sup.check_health()
        await w.sup.quiesce()

    run(scenario())


def test_a_spinning_stall_is_restarted_on_the_third_strike(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w, clock, _ = live_world(tmp_path, spin_snapshot())
    with caplog.at_level(logging.INFO):
        # Windows of 10 s at a 5 s health timer: a window closes every second tick, the
        # first at the third tick (t0 + 10 s); three hung windows by the seventh.
        health_ticks(w, clock, 6)
        assert ("restart", A) not in w.systemd.calls
        health_ticks(w, clock, 1)
    assert w.systemd.calls.count(("restart", A)) == 1
    hung = [r.getMessage() for r in caplog.records if "hung though /health" in r.getMessage()]
    assert len(hung) == 1
    assert "3 windows in a row of 10 s without a generated token while 2 requests ran" in hung[0]
    assert "tokens_stalled, gpu_spinning; GPU 100 % busy, memory utilization 0 %" in hung[0]
    assert len([r for r in caplog.records if "strike" in r.getMessage()]) == 3


def test_a_stall_while_memory_moves_is_a_prefill_not_a_hang(tmp_path: Path) -> None:
    w, clock, _ = live_world(tmp_path, decode_snapshot())
    health_ticks(w, clock, 12)
    assert ("restart", A) not in w.systemd.calls
    assert w.sup.watch.live["a"].last is not None
    assert w.sup.watch.live["a"].last.state.value == "busy"


def test_moving_tokens_clear_the_strikes(tmp_path: Path) -> None:
    w, clock, pages = live_world(tmp_path, spin_snapshot())
    health_ticks(w, clock, 5)  # two hung windows
    assert w.sup.watch.live["a"].strikes.count == 2
    pages["http://127.0.0.1:9001/metrics"] = metrics(900, 2)

    async def tick() -> None:
        clock.t += 5
        await w.sup.check_health()

    run(tick())
    run(tick())
    assert w.sup.watch.live["a"].strikes.count == 0
    assert ("restart", A) not in w.systemd.calls


def test_no_gpu_leaves_a_stall_unknown_unless_configured(tmp_path: Path) -> None:
    w, clock, _ = live_world(tmp_path, None)
    health_ticks(w, clock, 9)
    assert ("restart", A) not in w.systemd.calls
    (tmp_path / "2").mkdir()
    w2, clock2, _ = live_world(tmp_path / "2", None, "liveness_without_gpu = true")
    health_ticks(w2, clock2, 7)
    assert w2.systemd.calls.count(("restart", A)) == 1


def test_an_unhealthy_or_unanswering_engine_feeds_no_window(tmp_path: Path) -> None:
    w, clock, pages = live_world(tmp_path, spin_snapshot())
    pages.clear()  # /metrics does not answer: unknown, never a strike
    health_ticks(w, clock, 9)
    assert ("restart", A) not in w.systemd.calls
    assert w.sup.watch.live["a"].strikes.count == 0


def test_a_probe_failure_drops_the_window(tmp_path: Path) -> None:
    w, clock, _ = live_world(tmp_path, spin_snapshot())

    async def down(url: str) -> ProbeResult:
        return ProbeResult(url=url, status=None, error="cannot connect", latency_s=0.0)

    health_ticks(w, clock, 2)
    w.sup.deps.probe = down
    run(w.sup.check_health())
    assert "a" not in w.sup.watch.live
