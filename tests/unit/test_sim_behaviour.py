"""The simulated engine's (a test double's) request rules: alternation, validation, speed."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparkd.sim.behaviour import (
    ALTERNATION_MESSAGE,
    MAX_MODEL_LEN,
    ApiError,
    Generation,
    decode_json_body,
    decode_rate,
    parse_chat_request,
    parse_completion_request,
    roles_alternate,
    workload_class,
)

MODEL = "sim-small"
ROLE_CHARS = {"system": "s", "user": "u", "assistant": "a", "tool": "t", "developer": "d"}
roles_st = st.lists(st.sampled_from(sorted(ROLE_CHARS)), max_size=12)


def chat(*roles: str, **extra: Any) -> dict[str, Any]:
    messages = [{"role": r, "content": f"{r} message {i}"} for i, r in enumerate(roles)]
    return {"model": MODEL, "messages": messages, **extra}


def parse(body: object, *, strict: bool = False) -> Generation:
    return parse_chat_request(body, served_model=MODEL, strict_alternation=strict)


def rejection(body: object, *, strict: bool = False) -> ApiError:
    with pytest.raises(ApiError) as info:
        parse(body, strict=strict)
    return info.value


# --- strict alternation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "roles",
    [
        [],
        ["user"],
        ["system"],
        ["system", "user"],
        ["user", "assistant"],
        ["system", "user", "assistant", "user"],
        ["user", "assistant", "user", "assistant"],
    ],
)
def test_alternating_roles_pass(roles: list[str]) -> None:
    assert roles_alternate(roles)


@pytest.mark.parametrize(
    "roles",
    [
        ["assistant"],
        ["user", "user"],
        ["system", "system", "user"],
        ["system", "assistant"],
        ["user", "assistant", "assistant"],
        ["user", "system"],
        ["user", "assistant", "system", "user"],
        ["user", "assistant", "tool"],
        ["user", "tool", "user"],
        ["developer", "user"],
    ],
)
def test_broken_alternation_fails(roles: list[str]) -> None:
    assert not roles_alternate(roles)


@given(roles_st)
def test_alternation_matches_the_template_grammar(roles: list[str]) -> None:
    """Oracle: an optional system, then u a u a ..., nothing else, as a regular language."""
    encoded = "".join(ROLE_CHARS[r] for r in roles)
    assert roles_alternate(roles) == bool(re.fullmatch(r"s?(ua)*u?", encoded))


@given(system=st.booleans(), pairs=st.integers(0, 6), trailing_user=st.booleans(), data=st.data())
def test_any_doubled_role_breaks_alternation(
    *, system: bool, pairs: int, trailing_user: bool, data: st.DataObject
) -> None:
    roles = ["system"] * system + ["user", "assistant"] * pairs + ["user"] * trailing_user
    assert roles_alternate(roles)
    body = roles[int(system) :]
    if body:
        i = data.draw(st.integers(0, len(body) - 1))
        doubled = [*roles[: int(system) + i + 1], body[i], *roles[int(system) + i + 1 :]]
        assert not roles_alternate(doubled)


def test_strict_mode_rejects_with_sglang_error_body() -> None:
    error = rejection(chat("user", "user"), strict=True)
    assert error.status == 400
    assert error.body() == {
        "object": "error",
        "message": ALTERNATION_MESSAGE,
        "type": "BadRequestError",
        "param": None,
        "code": 400,
    }


def test_strict_mode_off_accepts_any_order() -> None:
    assert parse(chat("user", "user", "tool", "system")).prompt_tokens == 12


# --- speed model -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("response_format", "has_tools", "expected"),
    [
        ("text", False, "free"),
        ("json_object", False, "structured"),
        ("json_schema", False, "structured"),
        ("text", True, "structured"),
    ],
)
def test_workload_class(*, response_format: str, has_tools: bool, expected: str) -> None:
    assert workload_class(response_format=response_format, has_tools=has_tools) == expected


def test_speculation_speeds_free_text_and_slows_structured_output() -> None:
    assert decode_rate(100, speculative=False, workload="free") == 100
    assert decode_rate(100, speculative=False, workload="structured") == 100
    assert decode_rate(100, speculative=True, workload="free") == pytest.approx(250)
    assert decode_rate(100, speculative=True, workload="structured") == pytest.approx(60)


@given(st.floats(0.1, 1e5))
def test_speculation_orders_rates(base: float) -> None:
    assert (
        decode_rate(base, speculative=True, workload="structured")
        < decode_rate(base, speculative=False, workload="free")
        < decode_rate(base, speculative=True, workload="free")
    )


def test_request_workload_follows_response_format_and_tools() -> None:
    assert parse(chat("user")).workload == "free"
    json_mode = parse(chat("user", response_format={"type": "json_object"}))
    assert json_mode.workload == "structured"
    assert json_mode.json_output
    tool = {"type": "function", "function": {"name": "f"}}
    assert parse(chat("user", tools=[tool])).workload == "structured"


# --- validation --------------------------------------------------------------------------------


def test_chat_request_fields() -> None:
    gen = parse(
        chat(
            "system",
            "user",
            max_tokens=5,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert gen.topic == "user message 1"
    assert gen.prompt_tokens == 6
    assert gen.max_tokens == 5
    assert gen.stream
    assert gen.include_usage


def test_model_may_be_omitted_but_not_wrong() -> None:
    assert parse({"messages": [{"role": "user", "content": "hi"}]}).topic == "hi"
    error = rejection(chat("user") | {"model": "other"})
    assert error.status == 404
    assert error.body()["type"] == "NotFoundError"
    assert "`other`" in error.message


def test_usage_only_when_streaming() -> None:
    assert not parse(chat("user", stream_options={"include_usage": True})).include_usage


def test_max_completion_tokens_wins() -> None:
    assert parse(chat("user", max_tokens=9, max_completion_tokens=3)).max_tokens == 3


def test_context_length_is_the_cap() -> None:
    error = rejection(chat("user", max_tokens=MAX_MODEL_LEN))
    assert error.status == 400
    assert "maximum context length" in error.message


def test_content_parts_count_as_text() -> None:
    content = [{"type": "text", "text": "two words"}, {"type": "image_url", "image_url": {}}]
    gen = parse({"messages": [{"role": "user", "content": content}]})
    assert gen.topic == "two words"
    assert gen.prompt_tokens == 2


def test_assistant_content_may_be_null() -> None:
    body = {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": None}]}
    assert parse(body).prompt_tokens == 1


def test_tool_choice() -> None:
    tools = [
        {"type": "function", "function": {"name": "first"}},
        {"type": "function", "function": {"name": "second", "parameters": {}}},
    ]
    assert parse(chat("user", tools=tools)).tool is None
    assert parse(chat("user", tools=tools, tool_choice="auto")).tool is None
    required = parse(chat("user", tools=tools, tool_choice="required")).tool
    assert required is not None
    assert required.name == "first"
    named = {"type": "function", "function": {"name": "second"}}
    chosen = parse(chat("user", tools=tools, tool_choice=named)).tool
    assert chosen is not None
    assert chosen.name == "second"
    missing = {"type": "function", "function": {"name": "third"}}
    assert rejection(chat("user", tools=tools, tool_choice=missing)).status == 400
    assert rejection(chat("user", tool_choice="required")).status == 400


@pytest.mark.parametrize(
    "body",
    [
        [],
        "text",
        None,
        {},
        {"messages": []},
        {"messages": "hi"},
        {"messages": ["hi"]},
        {"messages": [{"content": "hi"}]},
        {"messages": [{"role": "robot", "content": "hi"}]},
        {"messages": [{"role": "user", "content": 5}]},
        {"messages": [{"role": "user"}]},
        {"messages": [{"role": "user", "content": [{"text": "no type"}]}]},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]},
        chat("user", model=3),
        chat("user", max_tokens="16"),
        chat("user", max_tokens=0),
        chat("user", max_tokens=True),
        chat("user", temperature="hot"),
        chat("user", seed=1.5),
        chat("user", stop=[1]),
        chat("user", n=2),
        chat("user", stream="yes"),
        chat("user", stream=True, stream_options=[]),
        chat("user", stream=True, stream_options={"include_usage": "yes"}),
        chat("user", response_format="json"),
        chat("user", response_format={"type": "xml"}),
        chat("user", response_format={"type": "json_schema"}),
        chat("user", tools={}),
        chat("user", tools=[{"type": "function"}]),
        chat("user", tools=[{"type": "function", "function": {"name": 3}}]),
        chat("user", tools=[{"type": "function", "function": {"name": "f", "parameters": 1}}]),
        chat("user", tool_choice=7),
    ],
)
def test_bad_chat_bodies_are_400(body: object) -> None:
    error = rejection(body)
    assert error.status == 400
    assert error.body()["code"] == 400


def test_malformed_json_is_400() -> None:
    for raw in (b"{bad", b"\xff\xfe", b"", b"[" * 100_000):
        with pytest.raises(ApiError) as info:
            decode_json_body(raw)
        assert info.value.status == 400
    assert decode_json_body(b'{"a": 1}') == {"a": 1}


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)
message_st = st.fixed_dictionaries(
    {},
    optional={
        "role": st.sampled_from([*ROLE_CHARS, "robot"]) | json_values,
        "content": st.text(max_size=20) | json_values,
        "tool_calls": json_values,
    },
)
body_st = st.fixed_dictionaries(
    {},
    optional={
        "model": st.just(MODEL) | json_values,
        "messages": st.lists(message_st | json_values, max_size=4) | json_values,
        "prompt": st.text(max_size=20) | st.lists(st.integers(0, 9)) | json_values,
        "max_tokens": st.integers(-2, 40) | json_values,
        "stream": st.booleans() | json_values,
        "stream_options": st.just({"include_usage": True}) | json_values,
        "response_format": st.sampled_from(
            [{"type": "text"}, {"type": "json_object"}, {"type": "json_schema"}]
        )
        | json_values,
        "tools": json_values,
        "tool_choice": st.sampled_from(["auto", "none", "required"]) | json_values,
        "n": st.integers(0, 2) | json_values,
        "temperature": json_values,
    },
)


@given(body=body_st | json_values, strict=st.booleans())
def test_any_body_is_a_generation_or_a_4xx(*, body: object, strict: bool) -> None:
    """Bad input is never an exception the server would answer with a 500."""
    attempts: tuple[Callable[[], object], ...] = (
        lambda: parse(body, strict=strict),
        lambda: parse_completion_request(body, served_model=MODEL),
    )
    for attempt in attempts:
        try:
            attempt()
        except ApiError as exc:
            assert 400 <= exc.status < 500
            json.dumps(exc.body())


def test_completion_prompts() -> None:
    assert parse_completion_request({"prompt": "a b c"}, served_model=MODEL).prompt_tokens == 3
    assert parse_completion_request({"prompt": ["a b"]}, served_model=MODEL).topic == "a b"
    assert parse_completion_request({"prompt": [1, 2, 3, 4]}, served_model=MODEL).prompt_tokens == 4
    for prompt in (None, 5, [], ["a", "b"], [1, "a"], [True]):
        with pytest.raises(ApiError) as info:
            parse_completion_request({"prompt": prompt}, served_model=MODEL)
        assert info.value.status == 400
