"""PURE: the workload classifier. What kind of generation a request asks for, which decides
whether speculative decoding helps it (the seed's fifth disaster).

    structured  response_format json_object / json_schema; tools, tool_choice, functions;
                vLLM guided_* / structured_outputs and SGLang regex / json_schema / ebnf fields
    vision      any image part in any message
    code        code fences, source-like lines, a coding assistant's system prompt or
                User-Agent (the rules are data: `Rules`, configurable under
                [gateway.classifier])
    chat        everything else

The first class that matches wins, in that order. `classify` never raises: a body of any
shape gets a class (bad input is the validator's to report, not the classifier's).

Its work is linear in the body and bounded: it reads at most `max_chars` characters of message
text in all (the first ones, in order; `gateway.classifier_chars`), and the code patterns are
tried at the start of each non-blank line only, so a pattern that is linear in its line keeps
the whole scan linear. The built-in patterns are (tests/unit/test_classify.py times them
on long hostile lines).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal

Workload = Literal["structured", "vision", "code", "chat"]
WORKLOADS: Final[tuple[Workload, ...]] = ("structured", "vision", "code", "chat")

STRUCTURED_FIELDS: Final = (
    "tools", "tool_choice", "functions", "function_call",
    # vLLM
    "guided_json", "guided_regex", "guided_choice", "guided_grammar", "structured_outputs",
    # SGLang
    "regex", "json_schema", "ebnf",
)
IMAGE_PART_TYPES: Final = frozenset({"image_url", "input_image", "image"})

DEFAULT_CODE_USER_AGENTS: Final = (
    "opencode", "aider", "cline", "roo-code", "roocode", "continue", "cursor", "vibe",
    "openclaw", "openhands", "claude-cli", "codex", "copilot", "kilo-code", "goose",
)
DEFAULT_CODE_SYSTEM_PROMPTS: Final = (
    "coding assistant", "software engineer", "expert programmer", "programming assistant",
    "code assistant", "senior engineer", "you write code", "pair programmer",
    "interactive cli tool that helps users with software engineering",
)
# Lines that look like source code; two or more in the messages' text make it code. Each is
# tried at the start of a line and runs in time linear in the line: no two adjacent
# repetitions can match the same characters (`\w+.*:` took 4.7 s on a 64 KiB line without a
# colon, `\}[ \t]*(else...)?[ \t]*$` 4.4 s on "}" and 20,000 tabs; `\w[^\n]*:` and
# `\}([ \t]*else...)?[ \t]*$` match the same lines in one pass).
DEFAULT_CODE_PATTERNS: Final = (
    r"^[ \t]*(def|class|async def)[ \t]+\w[^\n]*:[ \t]*$",
    r"^[ \t]*(import|from)[ \t]+[\w.]+([ \t]+import[ \t]+.+)?[ \t]*$",
    r"^[ \t]*#include[ \t]*[<\"]",
    r"^[ \t]*(public|private|protected|static)[ \t]+[\w<>\[\]]+[ \t]+\w+[ \t]*\(",
    r"^[ \t]*(function|fn|func)[ \t]+\w+[ \t]*\(",
    r"^[ \t]*(const|let|var)[ \t]+\w+[ \t]*=.*;[ \t]*$",
    r"^[ \t]*(if|for|while)[ \t]*\(.*\)[ \t]*\{[ \t]*$",
    r"^[ \t]*\}([ \t]*else[ \t]*\{)?[ \t]*$",
    r"^[ \t]*(package|use)[ \t]+[\w:.]+;[ \t]*$",
    r"^[ \t]*(SELECT|INSERT|UPDATE|DELETE|CREATE TABLE)\b.*",
    r"^diff --git |^@@ -\d+",
)
CODE_LINES_NEEDED: Final = 2
# Characters of message text looked at per request (gateway.classifier_chars): the first ones.
DEFAULT_MAX_CHARS: Final = 64 * 1024


@dataclass(frozen=True, slots=True)
class Rules:
    code_user_agents: tuple[str, ...] = DEFAULT_CODE_USER_AGENTS
    code_system_prompts: tuple[str, ...] = DEFAULT_CODE_SYSTEM_PROMPTS
    code_patterns: tuple[str, ...] = DEFAULT_CODE_PATTERNS

    def compiled(self) -> CompiledRules:
        return CompiledRules(
            user_agents=tuple(s.lower() for s in self.code_user_agents),
            system_prompts=tuple(s.lower() for s in self.code_system_prompts),
            source=_line_pattern(self.code_patterns),
        )


@dataclass(frozen=True, slots=True)
class CompiledRules:
    user_agents: tuple[str, ...]
    system_prompts: tuple[str, ...]
    source: re.Pattern[str]


def _line_pattern(patterns: Sequence[str]) -> re.Pattern[str]:
    """One pattern that tries each of `patterns` at the start of every non-blank line (and
    nowhere else: a search that tried every position of a line would be quadratic in it)."""
    if not patterns:
        return re.compile(r"(?!)")
    alternatives = "|".join(f"(?:{p})" for p in patterns)
    return re.compile(rf"^(?![ \t]*$)(?:{alternatives})", re.MULTILINE)


DEFAULT_RULES: Final = Rules().compiled()


def rules_from(
    *,
    code_user_agents: Sequence[str] | None = None,
    code_system_prompts: Sequence[str] | None = None,
    code_patterns: Sequence[str] | None = None,
) -> CompiledRules:
    """Rules with the configured lists in place of the built-in ones (None: built-in)."""
    base = Rules()
    return Rules(
        code_user_agents=tuple(code_user_agents) if code_user_agents is not None
        else base.code_user_agents,
        code_system_prompts=tuple(code_system_prompts) if code_system_prompts is not None
        else base.code_system_prompts,
        code_patterns=tuple(code_patterns) if code_patterns is not None else base.code_patterns,
    ).compiled()


@dataclass(frozen=True, slots=True)
class Classification:
    workload: Workload
    reason: str


def parse_override(value: str | None) -> Workload | None:
    """The `X-Sparkd-Workload` request header, when it names a class."""
    if value is None:
        return None
    lowered = value.strip().lower()
    for w in WORKLOADS:
        if lowered == w:
            return w
    return None


def classify(
    body: object, *, user_agent: str = "", rules: CompiledRules = DEFAULT_RULES,
    max_chars: int = DEFAULT_MAX_CHARS,
) -> Classification:
    if not isinstance(body, Mapping):
        return Classification("chat", "not a JSON object")
    reason = _structured(body)
    if reason:
        return Classification("structured", reason)
    messages = body.get("messages")
    if isinstance(messages, list) and any(_has_image(m) for m in messages):
        return Classification("vision", "an image part")
    ua = user_agent[:1024].lower()
    for marker in rules.user_agents:
        if marker and marker in ua:
            return Classification("code", f"User-Agent has {marker!r}")
    budget = max_chars
    texts: list[str] = []
    for m in _items(messages, body.get("prompt")):
        if budget <= 0:
            break
        if not isinstance(m, Mapping):
            continue
        text = _text(m.get("content"), budget)
        if not text:
            continue
        budget -= len(text) + 1
        texts.append(text)
        if m.get("role") in ("system", "developer"):
            lowered = text.lower()
            for marker in rules.system_prompts:
                if marker and marker in lowered:
                    return Classification("code", f"system prompt has {marker!r}")
    # One scan of all the text read (a regular expression call per message costs more than
    # a short message's share of the budget).
    scanned = "\n".join(texts)
    if "```" in scanned:
        return Classification("code", "a code fence")
    if _source_lines(scanned, rules.source) >= CODE_LINES_NEEDED:
        return Classification("code", "source-like lines")
    return Classification("chat", "no structured, vision or code signal")


def _items(messages: object, prompt: object) -> Iterator[object]:
    """The messages, then a completion's prompt (a string, or a list that may hold strings) as
    user messages."""
    if isinstance(messages, list):
        yield from messages
    if isinstance(prompt, str):
        yield {"role": "user", "content": prompt}
    elif isinstance(prompt, list):
        yield from ({"role": "user", "content": p} for p in prompt if isinstance(p, str))


def _structured(body: Mapping[str, Any]) -> str:
    fmt = body.get("response_format")
    if isinstance(fmt, Mapping) and fmt.get("type") in ("json_object", "json_schema"):
        return f"response_format {fmt.get('type')}"
    for key in STRUCTURED_FIELDS:
        value = body.get(key)
        if value is None or value == [] or value == {} or value is False:
            continue
        if key in ("tool_choice", "function_call") and value in ("none",):
            continue
        return f"field {key}"
    return ""


def _has_image(message: object) -> bool:
    if not isinstance(message, Mapping):
        return False
    content = message.get("content")
    return isinstance(content, list) and any(_is_image_part(p) for p in content)


def _is_image_part(part: object) -> bool:
    # A client may send any JSON as "type" (a list is unhashable): only a string can match.
    if not isinstance(part, Mapping):
        return False
    kind = part.get("type")
    return isinstance(kind, str) and kind in IMAGE_PART_TYPES


def _text(content: object, limit: int) -> str:
    """A message's text, its first `limit` characters at most (text parts joined by lines)."""
    if isinstance(content, str):
        return content[:limit]
    if not isinstance(content, list):
        return ""
    texts: list[str] = []
    for p in content:
        text = p.get("text") if isinstance(p, Mapping) else None
        if isinstance(text, str):
            texts.append(text[:limit])
            limit -= len(texts[-1]) + 1
            if limit <= 0:
                break
    return "\n".join(texts)


def _source_lines(text: str, pattern: re.Pattern[str]) -> int:
    count = 0
    for _ in pattern.finditer(text):
        count += 1
        if count >= CODE_LINES_NEEDED:
            break
    return count


def image_urls(body: object) -> list[str]:
    """The URLs of every image part (for the remote-image check)."""
    found: list[str] = []
    if not isinstance(body, Mapping) or not isinstance(body.get("messages"), list):
        return found
    for m in body["messages"]:
        content = m.get("content") if isinstance(m, Mapping) else None
        if not isinstance(content, list):
            continue
        for p in content:
            if not _is_image_part(p):
                continue
            ref = p.get("image_url")
            url = ref.get("url") if isinstance(ref, Mapping) else ref
            if isinstance(url, str):
                found.append(url)
    return found


def is_remote(url: str) -> bool:
    """Whether an engine would fetch this URL (anything but inline data: URLs)."""
    return not url.strip().lower().startswith("data:")
