"""The simulated engine's (a test double's) replies: deterministic tokens in OpenAI shapes."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparkd.sim.behaviour import Generation, ToolSpec
from sparkd.sim.responses import (
    DEFAULT_MAX_TOKENS,
    Envelope,
    chat_chunks,
    chat_completion,
    model_list,
    plan_reply,
    sse_event,
    text_chunks,
    text_completion,
    tool_arguments,
)

ENV = Envelope(id="chatcmpl-1", created=1, model="sim-small")
TOPIC = "please summarise the quarterly report for the board by friday morning"


def gen(**changes: Any) -> Generation:
    base: dict[str, Any] = {"topic": TOPIC, "prompt_tokens": 11, "max_tokens": None}
    return Generation(**(base | changes))


def test_free_text_runs_to_the_limit() -> None:
    reply = plan_reply(gen())
    assert reply.completion_tokens == DEFAULT_MAX_TOKENS
    assert reply.finish_reason == "length"
    assert reply.text.startswith('Simulated reply to "please summarise the quarterly')
    assert " ..." in reply.text  # the summary is cut after a few words
    assert plan_reply(gen(max_tokens=40)).completion_tokens == 40
    assert plan_reply(gen(max_tokens=2)).text == "Simulated reply"


def test_replies_are_deterministic() -> None:
    assert plan_reply(gen(max_tokens=30)) == plan_reply(gen(max_tokens=30))


def test_empty_topic() -> None:
    assert "(nothing)" in plan_reply(gen(topic="")).text


@given(st.integers(1, 200), st.text(max_size=40))
def test_json_output_is_valid_json_unless_cut(limit: int, topic: str) -> None:
    reply = plan_reply(gen(topic=topic, json_output=True, max_tokens=limit))
    assert reply.completion_tokens == limit
    if limit >= 2:
        assert reply.finish_reason == "stop"
        assert isinstance(json.loads(reply.text)["reply"], str)
    else:
        assert reply.finish_reason == "length"


def test_json_output_without_a_limit_is_the_sentence() -> None:
    reply = plan_reply(gen(json_output=True))
    assert json.loads(reply.text)["reply"].startswith("Simulated reply to")
    assert reply.finish_reason == "stop"


def test_tool_call_arguments_follow_the_schema() -> None:
    parameters = {
        "type": "object",
        "properties": {
            "city": {"type": "string"},
            "days": {"type": "integer"},
            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            "detailed": {"type": ["boolean", "null"]},
        },
    }
    reply = plan_reply(gen(tool=ToolSpec(name="get_weather", parameters=parameters)))
    assert reply.finish_reason == "tool_calls"
    assert reply.tool_call is not None
    assert reply.tool_call.name == "get_weather"
    assert reply.tool_call.id.startswith("call_")
    arguments = json.loads(reply.text)
    assert arguments["days"] == 1
    assert arguments["unit"] == "celsius"
    assert arguments["detailed"] is True
    assert arguments["city"].startswith("please summarise")
    body = chat_completion(reply, gen(), ENV)
    message = body["choices"][0]["message"]
    assert message["content"] is None
    assert message["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": reply.text}


def test_tool_arguments_without_properties() -> None:
    assert tool_arguments({}, "x") == {}
    assert tool_arguments({"properties": {"a": "not a schema"}}, "x") == {"a": "x"}


def test_a_client_limit_cuts_a_tool_call() -> None:
    tool = ToolSpec(name="f", parameters={"properties": {"q": {"type": "string"}}})
    reply = plan_reply(gen(tool=tool, max_tokens=2))
    assert reply.completion_tokens == 2
    assert reply.finish_reason == "length"


def test_chat_completion_shape() -> None:
    g = gen(max_tokens=3)
    body = chat_completion(plan_reply(g), g, ENV)
    assert body["object"] == "chat.completion"
    assert body["model"] == "sim-small"
    assert body["choices"][0]["message"] == {"role": "assistant", "content": "Simulated reply to"}
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"] == {"prompt_tokens": 11, "completion_tokens": 3, "total_tokens": 14}


@pytest.mark.parametrize("include_usage", [False, True])
def test_chat_stream_reassembles_the_reply(*, include_usage: bool) -> None:
    g = gen(max_tokens=7, stream=True, include_usage=include_usage)
    reply = plan_reply(g)
    events = list(chat_chunks(reply, g, ENV))
    assert sum(paced for _, paced in events) == reply.completion_tokens
    chunks = [payload for payload, _ in events]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    assert text == reply.text
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert [c["choices"][0]["finish_reason"] for c in finals] == ["length"]
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == 7
        assert all(c["usage"] is None for c in chunks[:-1])
    else:
        assert all("usage" not in c for c in chunks)


def test_chat_stream_of_a_tool_call() -> None:
    tool = ToolSpec(name="lookup", parameters={"properties": {"q": {"type": "string"}}})
    g = gen(tool=tool, stream=True)
    reply = plan_reply(g)
    chunks = [payload for payload, _ in chat_chunks(reply, g, ENV)]
    opening = chunks[0]["choices"][0]["delta"]["tool_calls"][0]
    assert reply.tool_call is not None
    assert opening["id"] == reply.tool_call.id
    assert opening["function"] == {"name": "lookup", "arguments": ""}
    arguments = "".join(
        c["choices"][0]["delta"]["tool_calls"][0]["function"]["arguments"] for c in chunks[1:-1]
    )
    assert json.loads(arguments) == {"q": json.loads(reply.text)["q"]}
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize("include_usage", [False, True])
def test_text_completion_and_stream(*, include_usage: bool) -> None:
    g = gen(max_tokens=5, stream=True, include_usage=include_usage)
    reply = plan_reply(g)
    body = text_completion(reply, g, ENV)
    assert body["object"] == "text_completion"
    assert body["choices"][0]["text"] == reply.text
    chunks = [payload for payload, _ in text_chunks(reply, g, ENV)]
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == reply.text
    assert [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]][-1] == "length"
    assert (chunks[-1]["choices"] == []) == include_usage


def test_sse_event_framing() -> None:
    assert sse_event({"a": [1, 2]}) == b'data: {"a":[1,2]}\n\n'


def test_model_list() -> None:
    body = model_list("sim-small", created=5, root="/models/sim-small")
    assert body["object"] == "list"
    assert [m["id"] for m in body["data"]] == ["sim-small"]
    assert body["data"][0]["object"] == "model"
