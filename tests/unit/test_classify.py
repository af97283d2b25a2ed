"""The workload classifier: each class from its signals, configurable code rules, the header
override; and (hypothesis) it never raises, whatever the body."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkd.gateway.classify import (
    classify,
    image_urls,
    is_remote,
    parse_override,
    rules_from,
)


def chat(*messages: dict[str, Any], **extra: Any) -> dict[str, Any]:
    return {"model": "m", "messages": list(messages), **extra}


USER = {"role": "user", "content": "Tell me about the sea."}
IMAGE = {"role": "user", "content": [{"type": "text", "text": "what is this"},
                                     {"type": "image_url", "image_url": {"url": "data:,x"}}]}


@pytest.mark.parametrize(("body", "workload"), [
    (chat(USER), "chat"),
    (chat(USER, response_format={"type": "json_object"}), "structured"),
    (chat(USER, response_format={"type": "json_schema", "json_schema": {}}), "structured"),
    (chat(USER, response_format={"type": "text"}), "chat"),
    (chat(USER, tools=[{"type": "function", "function": {"name": "f"}}]), "structured"),
    (chat(USER, tool_choice="none"), "chat"),
    (chat(USER, tools=[]), "chat"),
    (chat(USER, guided_json={"type": "object"}), "structured"),
    (chat(USER, structured_outputs={"regex": "a+"}), "structured"),
    (chat(USER, regex="[0-9]+"), "structured"),
    (chat(IMAGE), "vision"),
    (chat(IMAGE, tools=[{"type": "function"}]), "structured"),
    (chat({"role": "user", "content": "why does this fail?\n```py\nx = 1\n```"}), "code"),
    (chat({"role": "user", "content": "def parse(text):\n    return 1\nimport os\n"}), "code"),
    (chat({"role": "user", "content": "#include <stdio.h>\nint main() {\n}\n"}), "code"),
    (chat({"role": "system", "content": "You are an expert programmer."}, USER), "code"),
    (chat({"role": "user", "content": "I like the class of 1999: it was fun."}), "chat"),
    ({"model": "m", "prompt": "def f(x):\n    pass\nimport sys\n"}, "code"),
    ({"model": "m", "prompt": "Once upon a time"}, "chat"),
])
def test_classes(body: dict[str, Any], workload: str) -> None:
    assert classify(body).workload == workload


def test_coding_assistant_user_agent_is_code() -> None:
    assert classify(chat(USER), user_agent="opencode/0.3.1 ai-sdk").workload == "code"
    assert classify(chat(USER), user_agent="OpenAI/Python 1.99").workload == "chat"


def test_rules_are_configurable_data() -> None:
    rules = rules_from(code_user_agents=["my-ide"], code_system_prompts=[],
                       code_patterns=[r"^SQL>"])
    assert classify(chat(USER), user_agent="my-ide/2", rules=rules).workload == "code"
    assert classify(chat(USER), user_agent="opencode", rules=rules).workload == "chat"
    sql = chat({"role": "user", "content": "SQL> select 1\nSQL> select 2"})
    assert classify(sql, rules=rules).workload == "code"
    no_patterns = rules_from(code_patterns=[])
    assert classify(chat({"role": "user", "content": "def f():\nimport os"}),
                    rules=no_patterns).workload == "chat"


def test_override_header() -> None:
    assert parse_override(" Code ") == "code"
    assert parse_override("nonsense") is None
    assert parse_override(None) is None


def test_image_urls_and_remote_check() -> None:
    body = chat({"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "https://example.com/a.png"}},
        {"type": "image_url", "image_url": "data:image/png;base64,AAAA"}]})
    assert image_urls(body) == ["https://example.com/a.png", "data:image/png;base64,AAAA"]
    assert [is_remote(u) for u in image_urls(body)] == [True, False]


JSONISH = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(
        st.sampled_from(["role", "content", "type", "text", "messages", "tools", "prompt",
                         "response_format", "image_url", "url", "tool_choice", "x"]),
        inner, max_size=5),
    max_leaves=25,
)


@settings(max_examples=500, deadline=None)
@given(body=JSONISH | st.fixed_dictionaries({"messages": st.lists(JSONISH, max_size=5)}),
       ua=st.text(max_size=20))
def test_classifier_and_image_scan_never_raise(body: Any, ua: str) -> None:
    assert classify(body, user_agent=ua).workload in ("structured", "vision", "code", "chat")
    assert isinstance(image_urls(body), list)


# --- linear and bounded (issue 10, item 1) ---------------------------------------------------


@pytest.mark.parametrize("text", [
    "def " + "a" * 65536,  # no closing colon: `\w+.*:` tried every split of the line (4.7 s)
    "}" + "\t" * 20000 + ":x",  # two `[ \t]*` around an optional group (4.4 s)
    "class A" + " x" * 32768,
], ids=["def-without-colon", "brace-then-tabs", "class-long"])
def test_a_long_hostile_line_is_classified_in_linear_time(text: str) -> None:
    body = chat({"role": "user", "content": text})
    assert best_of_three(lambda: classify(body)) < 0.05


def test_the_classifier_reads_at_most_classifier_chars() -> None:
    late_code = "def f(x):\n    return x\nimport os\n"
    body = chat({"role": "user", "content": "prose " * 2000},
                {"role": "user", "content": late_code})
    assert classify(body).workload == "code"  # within the default 64 KiB
    assert classify(body, max_chars=5000).workload == "chat"  # past the budget: not looked at
    parts = chat({"role": "user", "content": [{"type": "text", "text": "x" * 5000},
                                              {"type": "text", "text": late_code}]})
    assert classify(parts, max_chars=100_000).workload == "code"
    assert classify(parts, max_chars=5000).workload == "chat"


def test_patterns_are_tried_at_line_starts_only() -> None:
    rules = rules_from(code_patterns=[r"SQL>"])
    assert classify(chat({"role": "user", "content": "SQL> a\nSQL> b"}),
                    rules=rules).workload == "code"
    assert classify(chat({"role": "user", "content": "a SQL> a\nb SQL> b"}),
                    rules=rules).workload == "chat"


def best_of_three(fn: Any) -> float:
    """The shortest CPU time of three runs: the test machine is shared."""
    times = []
    for _ in range(3):
        started = time.thread_time()
        fn()
        times.append(time.thread_time() - started)
    return min(times)


# Backtracking blows up on long repetitive runs: a prefix that starts a pattern (or not), then
# a short motif of the characters the patterns care about, repeated up to 200,000 characters.
PREFIXES = st.sampled_from(["", "def a", "class A", "async def f", "import a", "from a import ",
                            "#include ", "public a ", "function f", "let a =", "if (", "}",
                            "} else", "package a", "SELECT", "diff --git ", "@@ -1", "\t  "])
MOTIFS = st.text(alphabet=" \t\n:;(){}<>[].=_aZ1#@-\"'`", min_size=1, max_size=6)


@settings(max_examples=60, deadline=None)
@given(prefix=PREFIXES, motif=MOTIFS, size=st.integers(1000, 200_000), role=st.sampled_from(
    ["user", "system"]))
def test_the_classifier_takes_linear_time_on_repetitive_text(
    prefix: str, motif: str, size: int, role: str
) -> None:
    text = prefix + motif * (size // len(motif))
    body = chat({"role": role, "content": text})
    budget = max(0.005, len(text) * 0.050 / 100_000)  # 50 ms per 100 KB
    assert best_of_three(lambda: classify(body, max_chars=len(text))) < budget, (
        prefix, motif, size)
