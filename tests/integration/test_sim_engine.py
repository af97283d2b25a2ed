"""`sparkd sim-engine` for real: the simulated engine (a test double) as a child process on
loopback, observed the way sparkd and clients observe a real engine (HTTP, the official
`openai` client, exit statuses, signals, its log, its files and its memory)."""

from __future__ import annotations

import http.client
import json
import signal
import socket
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import openai
import psutil
import pytest

if TYPE_CHECKING:
    from conftest import SimEngine, SimEngines

MODEL = "sim-test"
MIB = 1024 * 1024


@pytest.fixture(scope="module")
def loaded(module_sim_engines: SimEngines) -> tuple[SimEngine, int, float]:
    """A ready engine: with the first /health status and the seconds it took to become ready."""
    engine = module_sim_engines.start(
        "--load-seconds", "1",
        "--weights-mib", "4",
        "--resident-mib", "128",
        "--tokens-per-second", "400",
        env={"VLLM_FLASHINFER_MOE_BACKEND": "latency"},
    )  # fmt: skip
    first = engine.wait_listening()
    return engine, first, engine.wait_health(200)


@pytest.fixture(scope="module")
def engine(loaded: tuple[SimEngine, int, float]) -> SimEngine:
    return loaded[0]


@pytest.fixture(scope="module")
def client(engine: SimEngine) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=engine.openai_url, api_key="x", max_retries=0) as client:
        yield client


# --- loading ---------------------------------------------------------------------------------


def test_health_is_503_while_loading_then_200(loaded: tuple[SimEngine, int, float]) -> None:
    engine, first, ready_after = loaded
    assert first == 503
    assert ready_after >= 1.0  # --load-seconds counts from the engine's start
    assert engine.get("/health") == (200, {"status": "ok"})


def test_synthetic_weights_are_written_read_and_memory_held(engine: SimEngine) -> None:
    weights = engine.path / "model-00001-of-00001.safetensors"
    raw = weights.read_bytes()
    assert len(raw) == 4 * MIB
    header = json.loads(raw[8 : 8 + int.from_bytes(raw[:8], "little")])
    assert header["weight"]["dtype"] == "U8"
    assert [p.name for p in engine.path.iterdir()] == [weights.name]  # no temp file left
    log = engine.log()
    assert "test double" in log
    assert "Using FlashInfer MoE backend: latency" in log
    assert "loaded 1 files (4.0 MiB) in " in log
    assert "resident memory: 128 MiB" in log
    assert f"ready on 127.0.0.1:{engine.port}" in log
    assert psutil.Process(engine.proc.pid).memory_info().rss > 128 * MIB


def test_existing_files_are_all_read_and_none_written(sim_engines: SimEngines) -> None:
    path = sim_engines.workdir / "existing"
    (path / "sub").mkdir(parents=True)
    (path / "config.json").write_text("{}")
    (path / "sub" / "weights.bin").write_bytes(b"\0" * (3 * MIB))
    engine = sim_engines.start("--load-seconds", "0", "--resident-mib", "0", path=path)
    engine.wait_health(200)
    assert sorted(p.name for p in path.rglob("*")) == ["config.json", "sub", "weights.bin"]
    assert "loaded 2 files (3.0 MiB)" in engine.log()
    assert "Using FlashInfer MoE backend: throughput" in engine.log()  # vLLM's old default


def test_unwritable_empty_model_dir_exits_2(sim_engines: SimEngines) -> None:
    blocker = sim_engines.workdir / "a-file"
    blocker.write_text("not a directory")
    engine = sim_engines.start("--load-seconds", "0", path=blocker / "model")
    assert engine.wait_exit() == 2
    errors = [line for line in engine.log().splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1
    assert str(blocker / "model") in errors[0]


def test_port_in_use_exits_1(sim_engines: SimEngines) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        engine = sim_engines.start("--load-seconds", "0", port=taken.getsockname()[1])
        assert engine.wait_exit() == 1
    assert "cannot listen on 127.0.0.1:" in engine.log()


def test_hang_on_start_stays_503_and_still_stops_on_sigterm(sim_engines: SimEngines) -> None:
    engine = sim_engines.start("--load-seconds", "0", "--hang-on-start", "--weights-mib", "1")
    assert engine.wait_listening() == 503
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        assert engine.get("/health") == (503, {"status": "loading"})
        assert engine.get("/v1/models")[0] == 503
        time.sleep(0.1)
    assert "hanging" in engine.log()
    assert_stops_fast(engine)


def test_crash_after_exits_1_with_an_oom_line(sim_engines: SimEngines) -> None:
    engine = sim_engines.start("--load-seconds", "0", "--crash-after", "2.0")
    engine.wait_health(200)
    assert engine.wait_exit(timeout=8) == 1
    assert time.monotonic() - engine.started >= 2.0
    log = engine.log()
    assert "simulated crash" in log
    assert "torch.OutOfMemoryError: CUDA out of memory (simulated)" in log


def test_sigterm_while_loading_exits_0_fast(sim_engines: SimEngines) -> None:
    engine = sim_engines.start("--load-seconds", "30", "--weights-mib", "64")
    assert engine.wait_listening() == 503
    assert_stops_fast(engine)


def test_sigterm_during_a_stream_exits_0_fast(sim_engines: SimEngines) -> None:
    engine = sim_engines.start("--load-seconds", "0", "--tokens-per-second", "100")
    engine.wait_health(200)
    conn = http.client.HTTPConnection("127.0.0.1", engine.port, timeout=5)
    try:
        body = {"messages": [{"role": "user", "content": "go"}], "max_tokens": 1000, "stream": True}
        conn.request("POST", "/v1/chat/completions", body=json.dumps(body))
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")
        assert_stops_fast(engine)
    finally:
        conn.close()


def assert_stops_fast(engine: SimEngine) -> None:
    began = time.monotonic()
    engine.proc.send_signal(signal.SIGTERM)
    assert engine.wait_exit(timeout=5) == 0
    assert time.monotonic() - began < 1.0


# --- the OpenAI API --------------------------------------------------------------------------


def test_models(client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list()] == [MODEL]


def test_chat(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is a DGX Spark?"},
        ],
        max_tokens=8,
    )
    choice = reply.choices[0]
    assert choice.message.content is not None
    assert choice.message.content.startswith('Simulated reply to "What is a DGX Spark?"')
    assert choice.finish_reason == "length"
    assert reply.usage is not None
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (7, 8)


def test_chat_stream_with_usage(client: openai.OpenAI) -> None:
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Stream please"}],
        max_tokens=12,
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finishes, usages = "", [], []
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finishes.append(chunk.choices[0].finish_reason)
        if chunk.usage is not None:
            usages.append(chunk.usage.completion_tokens)
    assert text.startswith('Simulated reply to "Stream please"')
    assert finishes[-1] == "length"
    assert usages == [12]


def test_chat_is_deterministic(client: openai.OpenAI) -> None:
    def ask() -> str | None:
        messages: Any = [{"role": "user", "content": "same question"}]
        reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=20)
        return reply.choices[0].message.content

    assert ask() == ask()


def test_decode_speed_is_observable(client: openai.OpenAI) -> None:
    began = time.monotonic()
    client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "count"}], max_tokens=80
    )
    assert 0.2 <= time.monotonic() - began < 2  # 80 tokens at 400 tokens/s


def test_required_tool_call(client: openai.OpenAI) -> None:
    tool: Any = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Weather in Paris?"}],
        tools=[tool],
        tool_choice="required",
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls
    call: Any = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Weather in Paris?"}


def test_json_mode(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "JSON please"}],
        response_format={"type": "json_object"},
    )
    assert json.loads(reply.choices[0].message.content or "")["reply"].startswith("Simulated")


def test_completions(client: openai.OpenAI) -> None:
    reply = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=6)
    assert reply.choices[0].text.startswith('Simulated reply to "Once')
    assert reply.usage is not None
    assert reply.usage.completion_tokens == 6
    stream = client.completions.create(
        model=MODEL, prompt="Once upon a time", max_tokens=6, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == reply.choices[0].text


def test_unknown_model_is_404(client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    assert "no-such-model" in str(info.value)


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b"{not json", 400),
        (b"\xff", 400),
        (b"[]", 400),
        (b'{"messages": "hi"}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "max_tokens": "lots"}', 400),
        (b'{"messages": [{"role": "user", "content": "hi"}], "stream": 1}', 400),
        (b'{"model": "other", "messages": [{"role": "user", "content": "hi"}]}', 404),
    ],
)
def test_bad_input_is_an_openai_error_never_a_500(
    engine: SimEngine, body: bytes, status: int
) -> None:
    for path in ("/v1/chat/completions", "/v1/completions"):
        got, error = engine.post(path, body)
        assert got == status
        assert error["object"] == "error"
        assert error["code"] == status


def test_unknown_routes_are_json_errors(engine: SimEngine) -> None:
    assert engine.get("/v1/nope")[1]["type"] == "NotFoundError"
    assert engine.get("/v1/chat/completions")[0] == 405


# --- modes -----------------------------------------------------------------------------------


def test_strict_alternation_is_a_bad_request_for_openai(sim_engines: SimEngines) -> None:
    engine = sim_engines.start("--load-seconds", "0", "--strict-alternation")
    engine.wait_health(200)
    with openai.OpenAI(base_url=engine.openai_url, api_key="x", max_retries=0) as client:
        ok = client.chat.completions.create(
            model=MODEL,
            messages=[
                {"role": "system", "content": "s"},
                {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"},
                {"role": "user", "content": "u"},
            ],
        )
        assert ok.choices[0].message.content
        with pytest.raises(openai.BadRequestError) as info:
            client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}],
            )
    assert info.value.status_code == 400
    assert info.value.body == {
        "object": "error",
        "message": "Conversation roles must alternate user/assistant/user/assistant/...",
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }


def test_speculative_speed_depends_on_the_workload(sim_engines: SimEngines) -> None:
    engine = sim_engines.start("--load-seconds", "0", "--speculative", "--tokens-per-second", "100")
    engine.wait_health(200)
    messages = [{"role": "user", "content": "x"}]

    def timed(**extra: Any) -> float:
        began = time.monotonic()
        status, _ = engine.post(
            "/v1/chat/completions", {"messages": messages, "max_tokens": 60, **extra}
        )
        assert status == 200
        return time.monotonic() - began

    # 60 tokens at a base of 100/s would take 0.6 s either way without speculation.
    free = timed()  # at 250/s: 0.24 s
    structured = timed(response_format={"type": "json_object"})  # at 60/s: 1.0 s
    assert free < 0.5
    assert structured >= 1.0
