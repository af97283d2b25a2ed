"""PURE replies of the simulated engine (a test double): deterministic tokens, OpenAI shapes.

`plan_reply` decides the tokens of a validated `Generation`; the builders shape them as OpenAI
responses and SSE chunks. Streams are sequences of (payload, paced) pairs: the server sleeps
before each paced one, so the decode speed is real while these functions stay pure.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from sparkd.sim.behaviour import JSON, MAX_MODEL_LEN, Generation

DEFAULT_MAX_TOKENS: Final = 16
SUMMARY_WORDS: Final = 8
ARGUMENT_PIECE_CHARS: Final = 4
OWNED_BY: Final = "sparkd-sim"
FILLER: Final = ("and", "so", "on")
SSE_DONE: Final = b"data: [DONE]\n\n"


@dataclass(frozen=True, slots=True)
class ToolCall:
    id: str
    name: str


@dataclass(frozen=True, slots=True)
class Reply:
    """The generated tokens: joined they are the text, or the tool call's arguments."""

    pieces: tuple[str, ...]
    finish_reason: str
    tool_call: ToolCall | None = None

    @property
    def text(self) -> str:
        return "".join(self.pieces)

    @property
    def completion_tokens(self) -> int:
        return len(self.pieces)


def summary(text: str) -> str:
    words = text.split()
    if not words:
        return "(nothing)"
    return " ".join(words[:SUMMARY_WORDS]) + (" ..." if len(words) > SUMMARY_WORDS else "")


def plan_reply(gen: Generation) -> Reply:
    """The deterministic reply: a short summary of the topic, then filler up to the limit.

    Free text always runs to its limit (default 16 tokens, finish "length"); JSON and tool
    calls end on their own ("stop", "tool_calls") unless the client's limit cuts them short.
    """
    if gen.tool is not None:
        arguments = json.dumps(tool_arguments(gen.tool.parameters, summary(gen.topic)))
        pieces = _split(arguments, ARGUMENT_PIECE_CHARS)
        digest = hashlib.sha256(f"{gen.tool.name}\0{arguments}".encode()).hexdigest()[:24]
        call = ToolCall(id=f"call_{digest}", name=gen.tool.name)
        return _limit(pieces, gen.max_tokens, "tool_calls", call)
    words = f'Simulated reply to "{summary(gen.topic)}"'.split()
    if gen.json_output:
        # With no limit the object holds just the sentence; with one it fills up to the limit.
        count = len(words) if gen.max_tokens is None else max(gen.max_tokens - 2, 0)
        body = [json.dumps(w)[1:-1] for w in _words(words, count)]
        return _limit(('{"reply": "', *_spaced(body), '"}'), gen.max_tokens, "stop")
    count = DEFAULT_MAX_TOKENS if gen.max_tokens is None else gen.max_tokens
    return Reply(pieces=_spaced(_words(words, count)), finish_reason="length")


def tool_arguments(parameters: Mapping[str, Any], text: str) -> dict[str, Any]:
    """Arguments that fit the function's JSON schema well enough: one value per property."""
    properties = parameters.get("properties")
    if not isinstance(properties, dict):
        return {}
    return {
        str(name): _sample_value(schema, text) if isinstance(schema, dict) else text
        for name, schema in properties.items()
    }


def _sample_value(schema: Mapping[str, Any], text: str) -> Any:
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[0]
    kind = schema.get("type")
    if isinstance(kind, list):
        kind = next((k for k in kind if k != "null"), "string")
    samples: dict[str, Any] = {
        "integer": 1,
        "number": 1.5,
        "boolean": True,
        "array": [],
        "object": {},
        "null": None,
    }
    return samples.get(kind, text) if isinstance(kind, str) else text


def _words(words: Sequence[str], count: int) -> list[str]:
    filler = [FILLER[i % len(FILLER)] for i in range(max(count - len(words), 0))]
    return [*words, *filler][:count]


def _spaced(words: Sequence[str]) -> tuple[str, ...]:
    return tuple(w if i == 0 else " " + w for i, w in enumerate(words))


def _split(text: str, size: int) -> tuple[str, ...]:
    return tuple(text[i : i + size] for i in range(0, len(text), size))


def _limit(
    pieces: Sequence[str], limit: int | None, finish: str, call: ToolCall | None = None
) -> Reply:
    if limit is not None and len(pieces) > limit:
        return Reply(pieces=tuple(pieces[:limit]), finish_reason="length", tool_call=call)
    return Reply(pieces=tuple(pieces), finish_reason=finish, tool_call=call)


# --- response builders -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Envelope:
    """What identifies one response: the same in every chunk of a stream."""

    id: str
    created: int
    model: str


def usage(gen: Generation, reply: Reply) -> JSON:
    return {
        "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": reply.completion_tokens,
        "total_tokens": gen.prompt_tokens + reply.completion_tokens,
    }


def model_list(model: str, *, created: int, root: str) -> JSON:
    entry = {
        "id": model,
        "object": "model",
        "created": created,
        "owned_by": OWNED_BY,
        "root": root,
        "parent": None,
        "max_model_len": MAX_MODEL_LEN,
    }
    return {"object": "list", "data": [entry]}


def chat_completion(reply: Reply, gen: Generation, env: Envelope) -> JSON:
    message: JSON = {"role": "assistant", "content": reply.text}
    if reply.tool_call is not None:
        message = {
            "role": "assistant",
            "content": None,
            "tool_calls": [_tool_call_json(reply.tool_call, reply.text)],
        }
    choice = {
        "index": 0,
        "message": message,
        "logprobs": None,
        "finish_reason": reply.finish_reason,
    }
    return {
        "id": env.id,
        "object": "chat.completion",
        "created": env.created,
        "model": env.model,
        "choices": [choice],
        "usage": usage(gen, reply),
    }


def chat_chunks(reply: Reply, gen: Generation, env: Envelope) -> Iterator[tuple[JSON, bool]]:
    """The SSE payloads of a streamed chat reply, each with whether it waits for a token."""
    call = reply.tool_call
    if call is None:
        yield _chat_chunk(env, gen, {"role": "assistant", "content": ""}), False
        for piece in reply.pieces:
            yield _chat_chunk(env, gen, {"content": piece}), True
    else:
        opening = {**_tool_call_json(call, ""), "index": 0}
        yield _chat_chunk(env, gen, {"role": "assistant", "tool_calls": [opening]}), False
        for piece in reply.pieces:
            delta = {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]}
            yield _chat_chunk(env, gen, delta), True
    yield _chat_chunk(env, gen, {}, reply.finish_reason), False
    if gen.include_usage:
        yield _envelope(env, "chat.completion.chunk", [], usage(gen, reply)), False


def text_completion(reply: Reply, gen: Generation, env: Envelope) -> JSON:
    choice = {
        "index": 0,
        "text": reply.text,
        "logprobs": None,
        "finish_reason": reply.finish_reason,
    }
    return _envelope(env, "text_completion", [choice], usage(gen, reply))


def text_chunks(reply: Reply, gen: Generation, env: Envelope) -> Iterator[tuple[JSON, bool]]:
    """The SSE payloads of a streamed completion, each with whether it waits for a token."""
    for i, piece in enumerate(reply.pieces):
        last = i == len(reply.pieces) - 1
        yield _text_chunk(env, gen, piece, reply.finish_reason if last else None), True
    if not reply.pieces:
        yield _text_chunk(env, gen, "", reply.finish_reason), False
    if gen.include_usage:
        yield _envelope(env, "text_completion", [], usage(gen, reply)), False


def sse_event(payload: Mapping[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":")).encode() + b"\n\n"


def _tool_call_json(call: ToolCall, arguments: str) -> JSON:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": arguments},
    }


def _chat_chunk(env: Envelope, gen: Generation, delta: JSON, finish: str | None = None) -> JSON:
    choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
    return _envelope(env, "chat.completion.chunk", [choice], None, with_usage=gen.include_usage)


def _text_chunk(env: Envelope, gen: Generation, text: str, finish: str | None) -> JSON:
    choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
    return _envelope(env, "text_completion", [choice], None, with_usage=gen.include_usage)


def _envelope(
    env: Envelope, kind: str, choices: list[JSON], usage_: JSON | None, *, with_usage: bool = True
) -> JSON:
    out: JSON = {
        "id": env.id,
        "object": kind,
        "created": env.created,
        "model": env.model,
        "choices": choices,
    }
    if with_usage:
        out["usage"] = usage_
    return out
