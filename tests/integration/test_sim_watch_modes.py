"""The simulated engine's watch modes, as a real process on loopback: /metrics with vLLM's
liveness series, --stall-after (tokens stop, /health stays 200) and --ramp-mib-per-s (resident
memory really grows)."""

from __future__ import annotations

import http.client
import threading
import time
from typing import TYPE_CHECKING

import psutil

from sparkd.monitor.liveness import EngineSample, engine_sample

if TYPE_CHECKING:
    from conftest import SimEngine, SimEngines

MIB = 1 << 20


def sample(engine: SimEngine) -> EngineSample:
    status, _ = engine.get("/health")
    assert status == 200
    status, text = engine.get("/metrics")
    assert status == 200 and isinstance(text, str)
    return engine_sample("sim", text, time.monotonic())


def chat(engine: SimEngine, out: list[str]) -> None:
    """A request that hangs once the engine stalls: it ends when the engine is stopped."""
    try:
        status, _ = engine.post("/v1/chat/completions", {
            "messages": [{"role": "user", "content": "tell me about the weather"}],
            "max_tokens": 400})
        out.append(str(status))
    except (OSError, http.client.HTTPException) as exc:
        out.append(type(exc).__name__)


def test_tokens_count_then_stop_while_health_stays_200(sim_engines: SimEngines) -> None:
    engine = sim_engines.start("--load-seconds", "0", "--tokens-per-second", "200",
                               "--stall-after", "1.5")
    engine.wait_health(200)
    idle = sample(engine)
    assert (idle.generated_tokens, idle.requests_running) == (0.0, 0.0)
    done: list[str] = []
    first = threading.Thread(target=chat, args=(engine, done), daemon=True)
    first.start()
    time.sleep(0.8)
    moving = sample(engine)
    assert moving.requests_running == 1.0
    assert moving.generated_tokens is not None and moving.generated_tokens > 50
    time.sleep(1.5)  # stalled now
    a = sample(engine)
    time.sleep(1.0)
    b = sample(engine)
    assert a.generated_tokens == b.generated_tokens  # flat
    assert b.requests_running == 1.0  # the request hangs, counted as running
    assert "stalled (simulated, --stall-after 1.5 s)" in engine.log()
    assert engine.terminate() == 0
    first.join(timeout=5)
    assert done == ["RemoteDisconnected"]  # it never finished: the stop cut it


def test_the_ramp_grows_resident_memory(sim_engines: SimEngines) -> None:
    engine = sim_engines.start("--load-seconds", "0", "--resident-mib", "0",
                               "--ramp-mib-per-s", "200", "--ramp-max-mib", "300")
    engine.wait_health(200)
    proc = psutil.Process(engine.proc.pid)
    before = proc.memory_info().rss
    time.sleep(0.75)
    middle = proc.memory_info().rss
    deadline = time.monotonic() + 5
    while "ramp done" not in engine.log() and time.monotonic() < deadline:
        time.sleep(0.05)
    after = proc.memory_info().rss
    assert 60 * MIB < middle - before < 240 * MIB  # ~150 MiB at 200 MiB/s
    assert after - before >= 290 * MIB
    assert engine.terminate() == 0
