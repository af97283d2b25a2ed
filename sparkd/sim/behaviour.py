"""PURE rules of the simulated engine (a test double): what it accepts and how fast it decodes.

Validation turns an OpenAI-style JSON body into a `Generation` or raises `ApiError` (always a
4xx for bad input, never an exception the server would turn into a 500). The strict alternation
check is SGLang's on Mistral; the speed model is EAGLE's content-dependent throughput. What the
reply says is `sparkd.sim.responses`.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

ALTERNATION_MESSAGE: Final = "Conversation roles must alternate user/assistant/user/assistant/..."
MAX_MODEL_LEN: Final = 8192

WorkloadClass = Literal["free", "structured"]
JSON = dict[str, Any]

# EAGLE-style speculation: drafts are accepted often for free text and rarely when a grammar
# constrains the output (JSON, tool calls), where the verification overhead makes it slower.
SPECULATIVE_FACTORS: Final[Mapping[WorkloadClass, float]] = {"free": 2.5, "structured": 0.6}

ROLES: Final = frozenset({"system", "developer", "user", "assistant", "tool"})
RESPONSE_FORMATS: Final = ("text", "json_object", "json_schema")
ERROR_TYPES: Final[Mapping[int, str]] = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestEntityTooLargeError",
    500: "InternalServerError",
    503: "ServiceUnavailableError",
}


class ApiError(Exception):
    """A request the simulated engine refuses, rendered as an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param

    @property
    def error_type(self) -> str:
        fallback = "BadRequestError" if self.status < 500 else "InternalServerError"
        return ERROR_TYPES.get(self.status, fallback)

    def body(self) -> JSON:
        """The body vLLM and SGLang send: flat, which the `openai` client understands."""
        return {
            "object": "error",
            "message": self.message,
            "type": self.error_type,
            "param": self.param,
            "code": self.status,
        }


# --- strict alternation and the speed model -------------------------------------------------


def roles_alternate(roles: Sequence[str]) -> bool:
    """Whether a strict chat template (Mistral v0.1, as SGLang applies it) accepts these roles.

    After one optional leading system message the roles must go user, assistant, user, ...;
    a later system message, a developer or a tool message breaks the pattern.
    """
    rest = roles[1:] if roles and roles[0] == "system" else roles
    return all(role == ("user" if i % 2 == 0 else "assistant") for i, role in enumerate(rest))


def workload_class(*, response_format: str, has_tools: bool) -> WorkloadClass:
    """Structured output (JSON modes, tools) versus free text: what speculation cares about."""
    return "structured" if has_tools or response_format != "text" else "free"


def decode_rate(base: float, *, speculative: bool, workload: WorkloadClass) -> float:
    """Tokens per second for one request: the base rate, scaled by speculation's effect."""
    return base * SPECULATIVE_FACTORS[workload] if speculative else base


# --- validation ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ToolSpec:
    name: str
    parameters: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class Generation:
    """One validated request: what to generate and how to deliver it."""

    topic: str  # the text the reply summarises (last user message, or the prompt)
    prompt_tokens: int
    max_tokens: int | None  # None: the client set no limit
    stream: bool = False
    include_usage: bool = False
    json_output: bool = False
    tool: ToolSpec | None = None
    workload: WorkloadClass = "free"


def decode_json_body(raw: bytes) -> object:
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError
        raise ApiError(400, f"Malformed JSON in request body: {exc}") from None


def parse_chat_request(
    body: object, *, served_model: str, strict_alternation: bool = False
) -> Generation:
    """Validate a /v1/chat/completions body into a `Generation`, or raise `ApiError`."""
    obj = _common_checks(body, served_model)
    messages = obj.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: expected a non-empty list of messages", param="messages")
    roles: list[str] = []
    texts: list[str] = []
    for i, message in enumerate(messages):
        role, text = _parse_message(message, f"messages[{i}]")
        roles.append(role)
        texts.append(text)
    if strict_alternation and not roles_alternate(roles):
        raise ApiError(400, ALTERNATION_MESSAGE)
    user_texts = [t for r, t in zip(roles, texts, strict=True) if r == "user"]
    response_format = _response_format(obj.get("response_format"))
    tools = _tools(obj.get("tools"))
    tool = _chosen_tool(obj.get("tool_choice"), tools)
    prompt_tokens = sum(count_words(t) for t in texts)
    return _finish(
        obj,
        Generation(
            topic=user_texts[-1] if user_texts else "",
            prompt_tokens=prompt_tokens,
            max_tokens=_max_tokens(obj, prompt_tokens),
            json_output=response_format != "text",
            tool=tool,
            workload=workload_class(response_format=response_format, has_tools=bool(tools)),
        ),
    )


def parse_completion_request(body: object, *, served_model: str) -> Generation:
    """Validate a /v1/completions body into a `Generation`, or raise `ApiError`."""
    obj = _common_checks(body, served_model)
    prompt = obj.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if isinstance(prompt, str):
        topic, prompt_tokens = prompt, count_words(prompt)
    elif isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        topic, prompt_tokens = "", len(prompt)  # token ids: nothing to summarise
    else:
        raise ApiError(
            400,
            "prompt: expected a string, a list of one string or a list of token ids"
            " (the simulated engine serves one prompt per request)",
            param="prompt",
        )
    return _finish(
        obj,
        Generation(
            topic=topic, prompt_tokens=prompt_tokens, max_tokens=_max_tokens(obj, prompt_tokens)
        ),
    )


def count_words(text: str) -> int:
    """The simulated tokenizer: a token is a word."""
    return len(text.split())


def _common_checks(body: object, served_model: str) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise ApiError(400, "request body: expected a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model: expected a string", param="model")
    if model is not None and model != served_model:
        raise ApiError(404, f"The model `{model}` does not exist.", param="model")
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise ApiError(400, "n: the simulated engine generates one choice (n = 1)", param="n")
    for key in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
        value = body.get(key)
        if value is not None and not _is_number(value):
            raise ApiError(400, f"{key}: expected a number", param=key)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, "seed: expected an integer", param="seed")
    stop = body.get("stop")
    if stop is not None and not (
        isinstance(stop, str) or (isinstance(stop, list) and all(isinstance(s, str) for s in stop))
    ):
        raise ApiError(400, "stop: expected a string or a list of strings", param="stop")
    return body


def _finish(obj: Mapping[str, Any], gen: Generation) -> Generation:
    """Add the delivery options every endpoint shares."""
    stream = obj.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: expected a boolean", param="stream")
    options = obj.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, dict):
            raise ApiError(400, "stream_options: expected an object", param="stream_options")
        include_usage = options.get("include_usage", False)
        if not isinstance(include_usage, bool):
            raise ApiError(
                400, "stream_options.include_usage: expected a boolean", param="stream_options"
            )
    return dataclasses.replace(gen, stream=stream, include_usage=stream and include_usage)


def _parse_message(message: object, where: str) -> tuple[str, str]:
    if not isinstance(message, dict):
        raise ApiError(400, f"{where}: expected an object", param="messages")
    role = message.get("role")
    if not isinstance(role, str) or role not in ROLES:
        raise ApiError(
            400, f"{where}.role: expected one of {', '.join(sorted(ROLES))}", param="messages"
        )
    content = message.get("content")
    if content is None and role == "assistant":
        return role, ""
    return role, _content_text(content, f"{where}.content")


def _content_text(content: object, where: str) -> str:
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}: expected a string or a list of parts", param="messages")
    texts: list[str] = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if not isinstance(kind, str):
            raise ApiError(400, f"{where}[{j}]: expected a part with a type", param="messages")
        if kind == "text":
            text = part.get("text")
            if not isinstance(text, str):
                raise ApiError(400, f"{where}[{j}].text: expected a string", param="messages")
            texts.append(text)
    return " ".join(texts)


def _max_tokens(obj: Mapping[str, Any], prompt_tokens: int) -> int | None:
    key = "max_completion_tokens" if obj.get("max_completion_tokens") is not None else "max_tokens"
    value = obj.get(key)
    if value is None:
        limit = None
    elif not _is_int(value) or value < 1:
        raise ApiError(400, f"{key}: expected an integer of at least 1", param=key)
    else:
        limit = int(value)
    requested = prompt_tokens + (limit or 0)
    if requested > MAX_MODEL_LEN:
        raise ApiError(
            400,
            f"This model's maximum context length is {MAX_MODEL_LEN} tokens. However, you"
            f" requested {requested} tokens ({prompt_tokens} in the messages, {limit or 0} in"
            " the completion). Please reduce the length of the messages or completion.",
            param=key,
        )
    return limit


def _response_format(value: object) -> str:
    if value is None:
        return "text"
    kind = value.get("type") if isinstance(value, dict) else None
    if kind not in RESPONSE_FORMATS:
        raise ApiError(
            400,
            "response_format: expected an object whose type is one of "
            + ", ".join(RESPONSE_FORMATS),
            param="response_format",
        )
    assert isinstance(value, dict)
    if kind == "json_schema" and not isinstance(value.get("json_schema"), dict):
        raise ApiError(
            400, "response_format.json_schema: expected an object", param="response_format"
        )
    return str(kind)


def _tools(value: object) -> list[ToolSpec]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise ApiError(400, "tools: expected a list", param="tools")
    tools: list[ToolSpec] = []
    for i, tool in enumerate(value):
        function = tool.get("function") if isinstance(tool, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(tool, dict) or tool.get("type") != "function" or not name:
            raise ApiError(400, f"tools[{i}]: expected a function tool with a name", param="tools")
        assert isinstance(function, dict)
        parameters = function.get("parameters", {})
        if not isinstance(name, str) or not isinstance(parameters, dict):
            raise ApiError(
                400,
                f"tools[{i}].function: expected a string name and object parameters",
                param="tools",
            )
        tools.append(ToolSpec(name=name, parameters=parameters))
    return tools


def _chosen_tool(choice: object, tools: Sequence[ToolSpec]) -> ToolSpec | None:
    """The tool the reply calls: only when the client requires one (auto answers in text)."""
    if choice is None or choice in ("none", "auto"):
        return None
    if choice == "required":
        if not tools:
            raise ApiError(400, 'tool_choice "required" needs tools', param="tool_choice")
        return tools[0]
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        raise ApiError(
            400,
            'tool_choice: expected "none", "auto", "required" or a named function',
            param="tool_choice",
        )
    for tool in tools:
        if tool.name == name:
            return tool
    raise ApiError(
        400, f"tool_choice: function {name!r} is not among the tools", param="tool_choice"
    )


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)
