"""PURE: role policies, i.e. what a chat's message list becomes for a model's chat template.

Many chat templates raise on role sequences the OpenAI schema allows (Mistral-7B-Instruct v0.1:
"Conversation roles must alternate user/assistant/user/assistant/..." and "Only user and
assistant roles are supported!"). Real clients send such sequences: a second user turn, a tool
result coded as a user message, a system message in the middle. The policies:

- `passthrough`: nothing changes.
- `merge`: consecutive messages of one role become one (text joined by a blank line, as
  mistral-common's `_aggregate_messages` does; content-part lists concatenated). Tool results
  are never merged (each answers its own call), nor is an assistant's text merged into an
  earlier assistant message with tool calls (it would move before the calls).
- `strict`: after an optional leading system message (only when the template takes one), only
  user and assistant, alternating, starting and ending with user. System messages are folded
  into the next user turn, tool calls become assistant text, tool results user text.
- `strict-tools`: as `strict`, except that an assistant message with tool calls stays structured
  and is followed by its tool results (newer Mistral templates accept that); the conversation
  may end with tool results. Calls without results, and results without a call, become text:
  a pair is never split and no filler turn is ever invented (LiteLLM issue 18685).
- `auto`: one of the above, by the model's family (`policy_for_family`).

Every rewrite keeps all text in order (filler is never inserted, framing only around tool
calls and results turned into text) and says how many changes it made. Its work is linear in
the size of the message list: a run of messages merged into one is joined once, not message
by message (which rebuilt the growing text per message: 20,000 one-role messages took 10 s).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Literal

Policy = Literal["passthrough", "merge", "strict", "strict-tools"]
Message = dict[str, Any]

SEPARATOR: Final = "\n\n"

# Lower-case substrings of a model's name, source or path -> (policy, keeps a system message).
# First match wins: the more specific entries come first.
FAMILIES: Final[tuple[tuple[str, Policy, bool], ...]] = (
    ("mistral-7b-instruct-v0.1", "strict", False),
    ("mistral-7b-instruct-v0.2", "strict", False),
    ("mixtral-8x7b-instruct", "strict", False),
    ("mixtral-8x22b-instruct", "strict", False),
    ("llama-2", "strict", True),
    ("llama2", "strict", True),
    ("gemma", "strict", False),
    ("mistral-small", "strict-tools", True),
    ("mistral-large", "strict-tools", True),
    ("mistral-medium", "strict-tools", True),
    ("mistral-7b-instruct-v0.3", "strict-tools", True),
    ("ministral", "strict-tools", True),
    ("magistral", "strict-tools", True),
    ("devstral", "strict-tools", True),
    ("codestral", "strict-tools", True),
    ("pixtral", "strict-tools", True),
    ("mistral", "strict-tools", True),
)


@dataclass(frozen=True, slots=True)
class PolicyChoice:
    policy: Policy
    keep_system: bool  # a leading system message stays (the template takes one)


def policy_for_family(*names: str | None) -> PolicyChoice:
    """`auto`: the policy of the most specific known family any of these names (the model's
    name, source, path) belongs to; passthrough for unknown families."""
    lowered = [(name or "").lower() for name in names]
    for needle, policy, keep_system in FAMILIES:  # the most specific family first
        if any(needle in name for name in lowered):
            return PolicyChoice(policy, keep_system)
    return PolicyChoice("passthrough", keep_system=True)


def resolve_policy(configured: str, *names: str | None) -> PolicyChoice:
    """The policy a model's `role_policy` means (`auto` looked up by family)."""
    if configured == "auto":
        return policy_for_family(*names)
    if configured == "strict":
        return PolicyChoice("strict", keep_system=False)
    if configured in ("passthrough", "merge", "strict-tools"):
        return PolicyChoice(configured, keep_system=True)  # type: ignore[arg-type]
    raise ValueError(f"unknown role policy {configured!r}")


@dataclass(frozen=True, slots=True)
class Rewrite:
    messages: list[Message]
    changes: int  # merges, folds and conversions made; 0: the list is unchanged
    roles_before: tuple[str, ...] = ()
    roles_after: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())


def roles(messages: Sequence[object]) -> tuple[str, ...]:
    return tuple(str(m.get("role", "?")) if isinstance(m, dict) else "?" for m in messages)


def rewrite(messages: Sequence[Message], choice: PolicyChoice) -> Rewrite:
    """Apply a policy. The input is validated by the caller (a list of dicts with a string
    role); anything else passes through untouched so that the engine reports it."""
    before = roles(messages)
    if choice.policy == "passthrough" or not _well_formed(messages):
        return Rewrite(list(messages), 0, before, before)
    work = _Work()
    if choice.policy == "merge":
        out = _merge_runs([dict(m) for m in messages], work, flatten=False)
    else:
        out = _strict(messages, work, keep_system=choice.keep_system,
                      tools=choice.policy == "strict-tools")
    if not work.notes:
        out = list(messages)
    return Rewrite(out, len(work.notes), before, roles(out), tuple(work.notes))


# --- checks the property tests (and `sparkctl rewrite`) use ----------------------------------


def satisfies(messages: Sequence[Message], choice: PolicyChoice) -> bool:
    """Whether a message list is one the policy's templates accept."""
    rs = roles(messages)
    if choice.policy == "passthrough":
        return True
    if choice.policy == "merge":
        return all(
            a.get("role") != b.get("role") or a.get("role") == "tool" or _keeps_apart(a, b)
            for a, b in itertools.pairwise(messages)
        )
    if not rs:
        return True
    rest = list(rs)
    if rest[0] == "system" and choice.keep_system:
        rest = rest[1:]
    if not rest:
        return True
    if choice.policy == "strict":
        return all(r == ("user" if i % 2 == 0 else "assistant") for i, r in enumerate(rest)) and (
            rest[-1] == "user"
        )
    # strict-tools: user (assistant | assistant-with-calls tool+ ...)*, ending with user/tool.
    msgs = list(messages)[len(rs) - len(rest):]
    expect_user, i = True, 0
    while i < len(msgs):
        m = msgs[i]
        if expect_user:
            if m.get("role") != "user":
                return False
            expect_user, i = False, i + 1
            continue
        if m.get("role") != "assistant":
            return False
        calls = m.get("tool_calls")
        if calls:
            ids = [c.get("id") for c in calls]
            j = i + 1
            got = []
            while j < len(msgs) and msgs[j].get("role") == "tool":
                got.append(msgs[j].get("tool_call_id"))
                j += 1
            if sorted(map(str, got)) != sorted(map(str, ids)):
                return False
            i = j
            # after results: the assistant continues (another turn) or the user speaks
            if i < len(msgs) and msgs[i].get("role") == "user":
                expect_user = True
            continue
        expect_user, i = True, i + 1
    return msgs[-1].get("role") in ("user", "tool")


def texts(messages: Sequence[Message]) -> list[str]:
    """Every piece of text a message list carries, in order (content, text parts, tool call
    names and arguments, tool results): what a rewrite must keep."""
    found: list[str] = []
    for m in messages:
        found.extend(_content_texts(m.get("content")))
        for call in m.get("tool_calls") or ():
            fn = call.get("function") or {}
            found.extend(s for s in (fn.get("name"), fn.get("arguments")) if s)
    return [t for t in found if t]


def keeps_content(before: Sequence[Message], after: Sequence[Message]) -> bool:
    """Whether every text of `before` appears in `after`'s text, in the same order."""
    haystack = "\x00".join(texts(after))
    pos = 0
    for piece in texts(before):
        found = haystack.find(piece, pos)
        if found < 0:
            return False
        pos = found + len(piece)
    return True


# --- the policies ----------------------------------------------------------------------------


class _Work:
    def __init__(self) -> None:
        self.notes: list[str] = []

    def note(self, what: str) -> None:
        self.notes.append(what)


def _well_formed(messages: Sequence[object]) -> bool:
    return all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and _content_ok(m.get("content"))
        and _calls_ok(m.get("tool_calls"))
        for m in messages
    )


def _calls_ok(calls: object) -> bool:
    """No tool calls, or a list of objects whose `function`, when there, is an object."""
    if calls is None:
        return True
    return isinstance(calls, list) and all(
        isinstance(c, dict) and isinstance(c.get("function", {}), dict) for c in calls
    )


def _content_ok(content: object) -> bool:
    if content is None or isinstance(content, str):
        return True
    return isinstance(content, list) and all(
        isinstance(p, dict) and isinstance(p.get("type"), str) for p in content
    )


def _content_texts(content: object) -> list[str]:
    if isinstance(content, str):
        return [content]
    if isinstance(content, list):
        return [
            p["text"] for p in content
            if isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
        ]
    return []


def _is_empty(content: object) -> bool:
    """No text and no other part (an image is content)."""
    if isinstance(content, list):
        return all(isinstance(p, dict) and p.get("type") == "text" and not p.get("text")
                   for p in content)
    return content is None or content == ""


def _join(a: object, b: object, *, flatten: bool) -> object:
    """Two contents as one: strings joined by a blank line, part lists concatenated."""
    if _is_empty(a):
        return b
    if _is_empty(b):
        return a
    if isinstance(a, str) and isinstance(b, str):
        return a + SEPARATOR + b
    if flatten and _text_only(a) and _text_only(b):
        return SEPARATOR.join([*_content_texts(a), *_content_texts(b)])
    return [*_as_parts(a), *_as_parts(b)]


class _Joined:
    """`_join` folded over a run of contents, in time linear in their size: the pieces are
    collected and joined once at the end."""

    def __init__(self, first: object, *, flatten: bool) -> None:
        self.flatten = flatten
        self.first = first
        self.first_empty = _is_empty(first)
        self.texts: list[str] | None = None  # joined as text (SEPARATOR between pieces)
        self.parts: list[Any] | None = None  # concatenated as a part list

    def add(self, b: object) -> None:
        if self.parts is None and self.texts is None and self.first_empty:
            self.first, self.first_empty = b, _is_empty(b)  # _join(empty, b) is b
            return
        if _is_empty(b):
            return
        if self.parts is not None:
            self.parts.extend(_as_parts(b))
            return
        joined_text = self.texts is not None
        if ((joined_text or isinstance(self.first, str)) and isinstance(b, str)) or (
                self.flatten and (joined_text or _text_only(self.first)) and _text_only(b)):
            if self.texts is None:
                self.texts = _content_texts(self.first)
            self.texts.extend(_content_texts(b))
            return
        self.parts = [*_as_parts(self.value()), *_as_parts(b)]

    def value(self) -> object:
        if self.parts is not None:
            return self.parts
        if self.texts is not None:
            return SEPARATOR.join(self.texts)
        return self.first


def _text_only(content: object) -> bool:
    return isinstance(content, str) or (
        isinstance(content, list) and all(p.get("type") == "text" for p in content)
    )


def _as_parts(content: object) -> list[Any]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    return list(content) if isinstance(content, list) else []


def _merge_runs(messages: list[Message], work: _Work, *, flatten: bool) -> list[Message]:
    """Consecutive messages of one role as one, as `_join` folded over each run would make
    them; each run is joined once (linear)."""
    out: list[Message] = []
    run: _Run | None = None
    for m in messages:
        if (run is not None and run.role == m["role"] and m["role"] != "tool"
                and not (run.calls and not _is_empty(m.get("content")))):  # _keeps_apart
            run.add(m)
            work.note(f"merged consecutive {m['role']} messages")
            continue
        if run is not None:
            out.append(run.message())
        run = _Run(m, flatten=flatten)
    if run is not None:
        out.append(run.message())
    return out


class _Run:
    """Messages of one role being merged: the first one's other fields, every content joined,
    every tool call."""

    def __init__(self, first: Message, *, flatten: bool) -> None:
        self.first = first
        self.role = first["role"]
        self.count = 1
        self.content = _Joined(first.get("content"), flatten=flatten)
        self.calls: list[Any] = list(first.get("tool_calls") or ())

    def add(self, m: Message) -> None:
        self.count += 1
        self.content.add(m.get("content"))
        self.calls.extend(m.get("tool_calls") or ())

    def message(self) -> Message:
        if self.count == 1:
            return self.first
        merged = dict(self.first)
        merged["content"] = self.content.value()
        if self.calls:
            merged["tool_calls"] = self.calls
        return merged


def _keeps_apart(prev: Mapping[str, Any], m: Mapping[str, Any]) -> bool:
    """An assistant's tool calls followed by an assistant's text stay two messages: merged,
    the text would come before the calls (a message's content precedes its calls)."""
    return bool(prev.get("tool_calls")) and not _is_empty(m.get("content"))


def _call_text(call: Mapping[str, Any]) -> str:
    fn = call.get("function") or {}
    name = fn.get("name", "?")
    args = fn.get("arguments", "")
    if not isinstance(args, str):
        args = json.dumps(args)
    return f"[tool call {call.get('id', '')}: {name}]\n{args}"


def _result_prefix(m: Mapping[str, Any], names: Mapping[str, str]) -> str:
    call_id = str(m.get("tool_call_id") or "")
    name = m.get("name") or names.get(call_id) or "tool"
    return f"[tool result {call_id}: {name}]"


def _as_text_message(role: str, m: Message, names: Mapping[str, str]) -> Message:
    """A message in the given role whose content is `m`'s, with tool framing as text."""
    if m.get("role") == "tool":
        joined = _Joined(_result_prefix(m, names), flatten=True)
        joined.add(m.get("content"))
    else:
        joined = _Joined(m.get("content"), flatten=True)
    for call in m.get("tool_calls") or ():
        joined.add(_call_text(call))
    content = joined.value()
    return {"role": role, "content": "" if content is None else content}


def _strict(
    messages: Sequence[Message], work: _Work, *, keep_system: bool, tools: bool
) -> list[Message]:
    names = {
        str(c.get("id")): str((c.get("function") or {}).get("name", "tool"))
        for m in messages for c in m.get("tool_calls") or () if isinstance(c, dict)
    }
    # 1. Which tool calls keep their structure: in strict-tools, those of an assistant message
    #    right after which all its results follow (and nothing else among them).
    kept_pairs = _kept_pairs(messages) if tools else set()
    # 2. Every message becomes user or assistant (or the leading system, or a kept pair).
    out: list[Message] = []
    for i, m in enumerate(messages):
        role = m["role"]
        if role in ("system", "developer"):
            if i == 0 and keep_system and role == "system" and not _is_empty(m.get("content")):
                out.append(m)
                continue
            out.append(_as_text_message("user", m, names))
            work.note(f"folded a {role} message at {i} into a user turn")
        elif role == "tool":
            if i in kept_pairs:
                out.append(m)
                continue
            out.append(_as_text_message("user", m, names))
            work.note(f"turned the tool result at {i} into user text")
        elif role == "assistant":
            if m.get("tool_calls") and i in kept_pairs:
                out.append(m)
            elif m.get("tool_calls"):
                out.append(_as_text_message("assistant", m, names))
                work.note(f"turned the tool calls at {i} into assistant text")
            else:
                out.append(m)
        elif role == "user":
            out.append(m)
        else:
            out.append(_as_text_message("user", m, names))
            work.note(f"turned a {role} message at {i} into a user turn")
    # 3. Empty assistant turns carry nothing and break templates: drop them.
    kept: list[Message] = []
    for m in out:
        if m["role"] == "assistant" and _is_empty(m.get("content")) and not m.get("tool_calls"):
            work.note("dropped an empty assistant message")
            continue
        kept.append(m)
    out = kept
    # 4. Start and end with user: a leading assistant turn (before any user) and a trailing
    #    one become user text. Then merge runs of one role.
    head = 1 if out and out[0]["role"] == "system" else 0
    if len(out) > head and out[head]["role"] == "assistant" and not _is_pair(out[head]):
        out[head] = _as_text_message("user", out[head], names)
        work.note("turned the leading assistant message into user text")
    if len(out) > head and out[-1]["role"] == "assistant":
        out[-1] = _as_text_message("user", out[-1], names)
        work.note("turned the trailing assistant message into user text")
    out = _merge_runs(out, work, flatten=True)
    # 5. Text-only part lists become strings (strict templates concatenate strings).
    for i, m in enumerate(out):
        content = m.get("content")
        if isinstance(content, list) and _text_only(content):
            out[i] = {**m, "content": SEPARATOR.join(_content_texts(content))}
            work.note(f"joined the text parts of message {i} into a string")
    return out


def _is_pair(m: Mapping[str, Any]) -> bool:
    return bool(m.get("tool_calls")) and m.get("role") == "assistant"


def _kept_pairs(messages: Sequence[Message]) -> set[int]:
    """Indexes of assistant tool-call messages, and of their tool results, that strict-tools
    keeps structured: every call answered exactly once by the results right after it, and a
    user message somewhere before (the conversation starts with user)."""
    kept: set[int] = set()
    seen_user = False
    i = 0
    while i < len(messages):
        m = messages[i]
        if m.get("role") == "user":
            seen_user = True
        calls = m.get("tool_calls") if m.get("role") == "assistant" else None
        if not calls:
            i += 1
            continue
        ids = [c.get("id") if isinstance(c, dict) else None for c in calls]
        j = i + 1
        got: list[object] = []
        while j < len(messages) and messages[j].get("role") == "tool":
            got.append(messages[j].get("tool_call_id"))
            j += 1
        valid_ids = all(isinstance(x, str) and x for x in ids) and len(set(ids)) == len(ids)
        if seen_user and valid_ids and got and sorted(map(str, got)) == sorted(map(str, ids)):
            kept.update(range(i, j))
        i = j
    return kept
