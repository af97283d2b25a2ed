"""The official `openai` client, sync and async, against the gateway in front of a simulated
engine (a test double) in strict-alternation mode (SGLang on Mistral): agent-shaped
conversations that the engine alone rejects are served through the gateway."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator

import openai
import pytest
import status_builders as sb
from conftest import SimEngine, SimEngines
from gateway_harness import Gateway, engine_entry, get, post, running_gateway
from openai.types.chat import (
    ChatCompletionMessageParam,
    ChatCompletionMessageToolCallParam,
    ChatCompletionToolParam,
)

MODEL = "mistral-strict"

CALL: ChatCompletionMessageToolCallParam = {
    "id": "call00001", "type": "function",
    "function": {"name": "read_file", "arguments": '{"path": "README.md"}'}}
TOOLS: list[ChatCompletionToolParam] = [{"type": "function", "function": {
    "name": "read_file", "description": "Read a file",
    "parameters": {"type": "object", "properties": {"path": {"type": "string"}}}}}]

AGENT_CONVERSATIONS: dict[str, list[ChatCompletionMessageParam]] = {
    "second user turn (session title)": [
        {"role": "system", "content": "You are a coding assistant."},
        {"role": "user", "content": "Generate a title for this session."},
        {"role": "user", "content": "Fix the failing test in parser.py"},
    ],
    "tool result sent as a user message": [
        {"role": "user", "content": "What does README.md say?"},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "user", "content": "[read_file result] sparkd supervises engines"},
        {"role": "user", "content": "Summarise it."},
    ],
    "mid-conversation system message": [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "system", "content": "The user's time zone is UTC."},
        {"role": "user", "content": "What time is it?"},
    ],
    "consecutive assistant messages": [
        {"role": "user", "content": "Plan the change."},
        {"role": "assistant", "content": "Step one: read the code."},
        {"role": "assistant", "content": "Step two: write the test."},
        {"role": "user", "content": "Go on."},
    ],
    "tool-call chain": [
        {"role": "system", "content": "Use tools."},
        {"role": "user", "content": "Read README.md then LICENSE."},
        {"role": "assistant", "content": None, "tool_calls": [CALL]},
        {"role": "tool", "tool_call_id": "call00001", "content": "sparkd readme"},
        {"role": "assistant", "content": None, "tool_calls": [
            {**CALL, "id": "call00002",
             "function": {"name": "read_file", "arguments": '{"path": "LICENSE"}'}}]},
        {"role": "tool", "tool_call_id": "call00002", "content": "Apache-2.0"},
    ],
}


@pytest.fixture(scope="module")
def strict_engine(module_sim_engines: SimEngines) -> SimEngine:
    engine = module_sim_engines.start("--strict-alternation", "--load-seconds", "0",
                                      "--tokens-per-second", "5000", model=MODEL)
    engine.wait_health(200)
    return engine


@pytest.fixture
def gateway(strict_engine: SimEngine) -> Iterator[Gateway]:
    config = f"""
[gateway]
listen = "{{listen}}"

[models.{MODEL}]
engine = "sim"
port = {strict_engine.port}
role_policy = "strict"
"""
    initial = sb.status(active_model=MODEL,
               engines=[engine_entry(MODEL, strict_engine.port)])
    with running_gateway(config, initial=initial) as gw:
        wait_loaded(gw)
        yield gw


def wait_loaded(gw: Gateway) -> None:
    for _ in range(200):
        body = get(gw.url + "/health").json()
        if body["loaded"]:
            return
        asyncio.run(asyncio.sleep(0.02))
    raise AssertionError("the gateway never saw the engine healthy")


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)


@pytest.mark.parametrize("name", sorted(AGENT_CONVERSATIONS))
def test_engine_alone_rejects_and_gateway_serves_agent_conversations(
    gateway: Gateway, strict_engine: SimEngine, name: str
) -> None:
    messages = AGENT_CONVERSATIONS[name]
    status, body = strict_engine.post("/v1/chat/completions",
                                      {"model": MODEL, "messages": messages})
    assert status == 400 and "alternate" in body["message"]
    with client(gateway) as c:
        raw = c.chat.completions.with_raw_response.create(model=MODEL, messages=messages)
        reply = raw.parse()
    assert reply.choices[0].message.content
    assert int(raw.headers["X-Sparkd-Rewrites"]) > 0
    assert raw.headers["X-Sparkd-Workload"] in ("code", "chat")


def test_sync_streaming_relays_every_chunk(gateway: Gateway) -> None:
    messages = AGENT_CONVERSATIONS["second user turn (session title)"]
    with client(gateway) as c:
        stream = c.chat.completions.create(model=MODEL, messages=messages, stream=True,
                                           max_tokens=20)
        pieces = [ch.choices[0].delta.content or "" for ch in stream if ch.choices]
    assert len(pieces) >= 5
    assert "".join(pieces).strip()


def test_sync_tools_round_trip_is_structured(gateway: Gateway) -> None:
    messages = AGENT_CONVERSATIONS["tool result sent as a user message"]
    with client(gateway) as c:
        raw = c.chat.completions.with_raw_response.create(
            model=MODEL, messages=messages, tools=TOOLS, tool_choice="required")
        reply = raw.parse()
    calls = reply.choices[0].message.tool_calls
    assert calls
    call = calls[0]
    assert call.type == "function" and call.function.name == "read_file"
    json.loads(call.function.arguments)
    assert raw.headers["X-Sparkd-Workload"] == "structured"


def test_async_client_streaming_and_not_with_tools(gateway: Gateway) -> None:
    async def go() -> tuple[str, str, int]:
        async with openai.AsyncOpenAI(base_url=gateway.url + "/v1", api_key="none",
                                      max_retries=0) as c:
            chain = AGENT_CONVERSATIONS["tool-call chain"]
            reply = await c.chat.completions.create(model=MODEL, messages=chain, tools=TOOLS)
            stream = await c.chat.completions.create(
                model=MODEL, messages=AGENT_CONVERSATIONS["consecutive assistant messages"],
                stream=True, stream_options={"include_usage": True})
            text, usage = "", 0
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                if chunk.usage:
                    usage = chunk.usage.completion_tokens
            return reply.choices[0].message.content or "", text, usage

    content, streamed, usage = asyncio.run(go())
    assert content and streamed.strip() and usage > 0


def test_completions_and_models(gateway: Gateway) -> None:
    with client(gateway) as c:
        text = c.completions.create(model=MODEL, prompt="Say something", max_tokens=5)
        models = c.models.list()
    assert text.choices[0].text
    [entry] = [m for m in models.data if m.id == MODEL]
    assert entry.model_extra is not None and entry.model_extra["sparkd"]["loaded"] is True


def test_errors_are_openai_style_and_never_500(gateway: Gateway) -> None:
    with client(gateway) as c:
        with pytest.raises(openai.NotFoundError) as nf:
            c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
        assert nf.value.code == "model_not_found"
        with pytest.raises(openai.BadRequestError) as bad:
            c.chat.completions.create(model=MODEL, messages="hello")  # type: ignore[arg-type]
        assert bad.value.code == "invalid_type"
        # The engine's own 400 (a bad max_tokens) comes back as an OpenAI error too.
        with pytest.raises(openai.BadRequestError) as engine_bad:
            c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                      max_tokens=0)
        assert "max_tokens" in engine_bad.value.message
    for raw, status, code in [
        (b"{not json", 400, "invalid_json"),
        (b"[1, 2]", 400, "invalid_type"),
        (json.dumps({"model": 7, "messages": []}).encode(), 400, "invalid_type"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": 5}]}).encode(),
         400, "invalid_type"),
        (json.dumps({"model": MODEL, "stream": "yes",
                     "messages": [{"role": "user", "content": "x"}]}).encode(),
         400, "invalid_type"),
        (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "http://169.254.169.254/latest"}}]}]}
         ).encode(), 400, "remote_media_refused"),
    ]:
        r = post(gateway.url + "/v1/chat/completions", content=raw,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == status, (raw, r.text)
        assert r.json()["error"]["code"] == code
    # Odd shapes inside valid messages reach the engine, whose 400 comes back: never a 500.
    for messages in ([{"role": "user", "content": [{"type": []}]}],
                     [{"role": "user", "content": [7, None]}]):
        r = post(gateway.url + "/v1/chat/completions",
                 json_body={"model": MODEL, "messages": messages})
        assert r.status_code == 400, (messages, r.text)
        assert r.json()["error"]["message"]
    # An image part without a URL string is no remote image: the engine decides (it ignores it).
    r = post(gateway.url + "/v1/chat/completions", json_body={"model": MODEL, "messages": [
        {"role": "user", "content": [{"type": "image_url", "image_url": 5}]}]})
    assert r.status_code == 200 and r.headers["X-Sparkd-Workload"] == "vision"
    # An unknown role is user text to a strict template.
    r = post(gateway.url + "/v1/chat/completions",
             json_body={"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]})
    assert r.status_code == 200 and r.headers["X-Sparkd-Rewrites"] == "1"
    r = post(gateway.url + "/v1/chat/completions", content=b"x" * (33 * 1024 * 1024),
             headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    r = get(gateway.url + "/nowhere")
    assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
    r = post(gateway.url + "/health", json_body={})
    assert r.status_code == 405 and r.headers["Allow"] == "GET, HEAD"
    assert r.json()["error"]["code"] == "method_not_allowed"
    # Still serving.
    with client(gateway) as c:
        assert c.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "still there?"}]).choices


def test_workload_header_overrides_and_metrics_count(gateway: Gateway) -> None:
    r = post(gateway.url + "/v1/chat/completions",
                   json_body={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
                   headers={"X-Sparkd-Workload": "code"})
    assert r.status_code == 200 and r.headers["X-Sparkd-Workload"] == "code"
    post(gateway.url + "/v1/chat/completions", json_body={
        "model": MODEL, "messages": AGENT_CONVERSATIONS["consecutive assistant messages"]})
    text = get(gateway.url + "/metrics").text
    assert f'sparkd_gateway_rewritten_requests_total{{model="{MODEL}",policy="strict"}}' in text
    assert 'sparkd_gateway_requests_total{model="mistral-strict",route="/v1/chat/completions"' \
           ',status="200",variant="plain",workload="code"}' in text


def test_each_rewrite_is_logged_with_the_roles_before_and_after(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="sparkd.gateway.app")
    post(gateway.url + "/v1/chat/completions", json_body={
        "model": MODEL, "messages": AGENT_CONVERSATIONS["mid-conversation system message"]})
    assert ("role policy strict rewrote mistral-strict's messages (2 changes):"
            " user,assistant,system,user -> user,assistant,user") in caplog.text


def test_passthrough_routes_other_v1_paths(gateway: Gateway) -> None:
    r = get(gateway.url + "/v1/models/whatever")
    # The simulated engine has no such route: its 404 comes back as an OpenAI-style error.
    assert r.status_code == 404 and "error" in r.json()
