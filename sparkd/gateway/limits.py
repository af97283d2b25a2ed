"""PURE: what a request body must be before the gateway works on it, and how big it may be.

The gateway's work per request is linear in the body and bounded by these caps
(`[gateway]` in sparkd.toml, docs/configuration.md):

    max_body_bytes     the body (aiohttp refuses a larger one with 413 while reading it)
    max_messages       messages in a chat request                          (400 past it)
    max_parts          content parts and tool calls of all messages together (400 past it)
    classifier_chars   characters of message text the classifier reads (the first ones; no
                       refusal: the rest is simply not looked at)

A body of the wrong shape is refused with an OpenAI-style 400 naming the field (`param`),
never passed to the rewrite or the engine to fail there: messages are objects with a string
role; a content is null, a string or a list of objects; a text part's text is a string; tool
calls are a list of objects whose `function` is an object with a string `name` and string or
object `arguments`; `tool_call_id` and `name` are strings. A string holding a lone UTF-16
surrogate (`"\\ud800"`) is not Unicode text and is refused too.

The checks look only at what the caps bound: counts are compared before anything is walked.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Final

from sparkd.gateway.errors import GatewayError

DEFAULT_MAX_MESSAGES: Final = 4096
DEFAULT_MAX_PARTS: Final = 16384
DEFAULT_CLASSIFIER_CHARS: Final = 64 * 1024

# A \uD800-\uDFFF escape anywhere in the raw body: only then can a decoded string hold a lone
# surrogate (UTF-8 cannot encode one, so json.loads makes them only from escapes).
_SURROGATE_ESCAPE: Final = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


@dataclass(frozen=True, slots=True)
class Limits:
    max_messages: int = DEFAULT_MAX_MESSAGES
    max_parts: int = DEFAULT_MAX_PARTS
    classifier_chars: int = DEFAULT_CLASSIFIER_CHARS


def parse_body(raw: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        # UnicodeDecodeError is a ValueError: a body that is not UTF-8 lands here too.
        raise GatewayError(400, "invalid_json", f"request body is not valid JSON: {exc}"
                           ) from None
    if not isinstance(body, dict):
        raise GatewayError(400, "invalid_type", "request body: expected a JSON object")
    if _SURROGATE_ESCAPE.search(raw) is not None:
        check_unicode(body)
    return body


def check_unicode(body: object) -> None:
    """A 400 when a string anywhere in the body holds a lone surrogate (a pair escaped as two
    \\u escapes is one character after decoding, and fine)."""
    try:
        json.dumps(body, ensure_ascii=False).encode()
    except UnicodeEncodeError as exc:
        raise GatewayError(
            400, "invalid_unicode",
            f"request body: a string holds a lone UTF-16 surrogate ({exc.object[exc.start]!a}),"
            " which is not Unicode text") from None


def check_chat(body: dict[str, Any], limits: Limits) -> list[dict[str, Any]]:
    """The messages of a chat request, checked: a 400 naming the first problem."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise GatewayError(400, "invalid_type", "messages: expected a non-empty list",
                           param="messages")
    if len(messages) > limits.max_messages:
        raise GatewayError(400, "too_many_messages",
                           f"messages: {len(messages)} messages, more than the gateway's limit"
                           f" of {limits.max_messages} (gateway.max_messages)",
                           param="messages")
    parts = 0
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise GatewayError(400, "invalid_type",
                               f"messages[{i}]: expected an object with a string role",
                               param="messages")
        content = m.get("content")
        calls = m.get("tool_calls")
        parts += (len(content) if isinstance(content, list) else 0) + (
            len(calls) if isinstance(calls, list) else 0)
        if parts > limits.max_parts:
            raise GatewayError(400, "too_many_parts",
                               f"messages: more than {limits.max_parts} content parts and tool"
                               f" calls in all (gateway.max_parts)", param="messages")
        _check_content(content, i)
        if calls is not None:
            _check_calls(calls, i)
        for key in ("tool_call_id", "name"):
            value = m.get(key)
            if value is not None and not isinstance(value, str):
                raise GatewayError(400, "invalid_type",
                                   f"messages[{i}].{key}: expected a string", param="messages")
    return messages


def _check_content(content: object, i: int) -> None:
    if content is None or isinstance(content, str):
        return
    if not isinstance(content, list):
        raise GatewayError(400, "invalid_type",
                           f"messages[{i}].content: expected a string or a list of parts",
                           param="messages")
    for j, part in enumerate(content):
        if not isinstance(part, dict):
            raise GatewayError(400, "invalid_type",
                               f"messages[{i}].content[{j}]: expected an object",
                               param="messages")
        kind = part.get("type")
        if kind is not None and not isinstance(kind, str):
            raise GatewayError(400, "invalid_type",
                               f"messages[{i}].content[{j}].type: expected a string",
                               param="messages")
        if kind == "text" and not isinstance(part.get("text"), str):
            raise GatewayError(400, "invalid_type",
                               f"messages[{i}].content[{j}].text: expected a string",
                               param="messages")


def _check_calls(calls: object, i: int) -> None:
    where = f"messages[{i}].tool_calls"
    if not isinstance(calls, list):
        raise GatewayError(400, "invalid_type", f"{where}: expected a list of tool calls",
                           param="messages")
    for j, call in enumerate(calls):
        if not isinstance(call, dict):
            raise GatewayError(400, "invalid_type", f"{where}[{j}]: expected an object",
                               param="messages")
        call_id = call.get("id")
        if call_id is not None and not isinstance(call_id, str):
            raise GatewayError(400, "invalid_type", f"{where}[{j}].id: expected a string",
                               param="messages")
        fn = call.get("function")
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise GatewayError(400, "invalid_type",
                               f"{where}[{j}].function: expected an object with a string name",
                               param="messages")
        args = fn.get("arguments")
        if args is not None and not isinstance(args, str | dict):
            raise GatewayError(400, "invalid_type",
                               f"{where}[{j}].function.arguments: expected a string",
                               param="messages")
