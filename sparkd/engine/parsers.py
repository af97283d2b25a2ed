"""The real engines' argument parsers, as recorded per release in sparkd/engine/fixtures/
(`make engine-fixtures`: scripts/engine_fixtures.py), and the check of a command line and
environment against them.

`check_argv` replays argparse on the recorded parser (llama.cpp's own loop for llama.cpp: no
`--flag=value`, underscores read as dashes): an unknown flag, a removed flag (llama.cpp
keeps those only to exit 1 on them), a value the flag's type does not take, a choice the
release does not offer, a missing value. `check_env`: a variable in the engine's namespace
(VLLM_*, SGLANG_*, LLAMA_*) that the release does not read. Reading a fixture is impure (a
file); the checks are pure. Used by `sparkd check-config` (sparkd.engine.linecheck) and the
tests; never on the daemon's hot path.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Final

from sparkd.engine.argforms import llama_word, vllm_word
from sparkd.engine.version_form import parse_version

FIXTURES: Final = Path(__file__).resolve().parent / "fixtures"

#: What llama.cpp says to use instead of a removed flag (common/arg.cpp at b9093 and b11434:
#: "the argument has been removed. use --spec-draft-n-max").
REPLACEMENTS: Final = {
    "--draft-max": "--spec-draft-n-max", "--draft-n": "--spec-draft-n-max",
    "--draft": "--spec-draft-n-max", "--draft-min": "--spec-draft-n-min",
    "--draft-n-min": "--spec-draft-n-min",
}


@functools.cache
def fixture(engine: str, version: str) -> dict[str, Any]:
    """The recorded parser of one release (a file name under FIXTURES)."""
    path = FIXTURES / f"{engine}-{version}.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


def recorded() -> list[tuple[str, str]]:
    """(engine, release) of every recorded parser."""
    return sorted(tuple(p.stem.split("-", 1)) for p in FIXTURES.glob("*.json"))  # type: ignore[misc]


def fixture_for(engine: str, version: str) -> str | None:
    """The recorded release whose parser `version` has: vLLM by minor release (0.34.2 ->
    0.34.0: patch releases keep the flags), SGLang by release (0.5.23.post1 -> 0.5.23),
    llama.cpp by build. None: no parser of that release is recorded."""
    try:
        want = parse_version(engine, version)
    except ValueError:
        return None
    width = 2 if engine == "vllm" else 3
    for kind, release in recorded():
        if kind == engine and parse_version(engine, release).release[:width] == \
                want.release[:width]:
            return release
    return None


def _check_value(flag: str, spec: dict[str, Any], value: str) -> list[str]:
    problems = []
    kind = spec.get("type") or "str"
    try:
        if kind == "int" or kind.endswith("> int"):
            int(value)
        elif kind == "float" or kind.endswith("> float"):
            float(value)
        elif "loads" in kind and (value.lstrip().startswith("{") or "union" not in kind):
            json.loads(value)
        elif "human_readable_int" in kind and not ("or_auto" in kind and value == "auto"):
            float(value.rstrip("kKmMgGtT") or "x")
    except ValueError:
        problems.append(f"{flag} {value!r}: not a value of type {kind}")
    choices = spec.get("choices")
    if choices is not None:
        items = value.split(spec["list_sep"]) if spec.get("list_sep") else [value]
        for item in items:
            normal = item.lower().replace("-", "_") if "<lambda>" in kind else item
            if normal not in choices:
                problems.append(f"{flag} {item!r}: not one of the choices {choices}")
    return problems


def check_argv(fx: dict[str, Any], args: list[str]) -> list[str]:
    """What the recorded parser would refuse in `args` (the words after the entrypoint;
    vLLM's from `serve` on)."""
    flags: dict[str, Any] = fx["flags"]
    problems: list[str] = []
    words = list(args)
    if fx["engine"] == "vllm":
        if not words or words[0] != "serve":
            return [f"vLLM's command line starts with 'serve', got {words[:1]}"]
        words = words[1:]
        if words and not words[0].startswith("-"):
            words = words[1:]  # the model (serve's model_tag positional)
    i = 0
    while i < len(words):
        word = words[i]
        i += 1
        if not word.startswith("-"):
            problems.append(f"{word!r}: an argument no flag takes")
            continue
        if fx["engine"] == "vllm":
            word = vllm_word(word)
        if fx["engine"] == "llamacpp":
            word = llama_word(word)
            if "=" in word:
                # llama-server looks the whole word up: b9093 and b11434 common/arg.cpp
                # throw "error: invalid argument: --ctx-size=4096" (it exits 1).
                problems.append(f"{word}: llama-server takes no --flag=value form (it exits "
                                f"with 'error: invalid argument: {word}')")
                continue
        flag, eq, inline = word.partition("=")
        spec = flags.get(flag)
        if spec is None:
            problems.append(f"{flag}: not a flag of {fx['engine']} {fx['version']}")
            if not eq and i < len(words) and not words[i].startswith("-"):
                i += 1  # its value, most likely: one problem, not two
            continue
        if spec.get("removed"):  # llama.cpp keeps removed flags only to exit 1 on them
            problems.append(f"{flag}: removed in {fx['engine']} {fx['version']}")
        if spec["kind"] in ("switch", "bool_optional", "help") or spec.get("nargs") == 0:
            if eq:
                problems.append(f"{flag} takes no value")
            continue
        nargs = spec.get("nargs")
        values: list[str] = []
        if eq:
            values = [inline]
        elif nargs in (None, 1):
            if i >= len(words) or (words[i].startswith("--") and words[i] in flags):
                problems.append(f"{flag}: expected a value")
                continue
            values = [words[i]]
            i += 1
        elif nargs == "?":
            if i < len(words) and not words[i].startswith("-"):
                values = [words[i]]
                i += 1
        else:  # "+", "*", N
            while i < len(words) and not words[i].startswith("-"):
                values.append(words[i])
                i += 1
            if nargs == "+" and not values:
                problems.append(f"{flag}: expected one or more values")
        for value in values:
            problems += _check_value(flag, spec, value)
    return problems


def check_env(fx: dict[str, Any], env: list[tuple[str, str]]) -> list[str]:
    prefix: str = fx["env"]["prefix"]
    known = set(fx["env"]["names"])
    return [f"{k}: not a variable {fx['engine']} {fx['version']} reads"
            for k, _ in env if k.startswith(prefix) and k not in known]
