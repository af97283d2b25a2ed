"""Every rendered vLLM and SGLang command line and environment, checked against the real
argument parsers of each supported release (tests/fixtures/engines/, written by
`make engine-fixtures`: scripts/engine_fixtures.py).

The check replays argparse on the recorded parser: an unknown flag, a value the flag's type
does not take, a choice the release does not offer, a missing value, and an environment
variable in the engine's namespace (VLLM_*, SGLANG_*) that the release does not read are all
problems. `test_the_check_catches_*` prove each of those fails on a deliberately bad render.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from test_render import golden_config

from sparkd.config import VARIANTS, ModelConfig
from sparkd.engine.versions import FIXTURE_VERSIONS, rules_for
from sparkd.units.render import EngineCommand, engine_command

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures" / "engines"
CHECKED = [(e, v) for e, v in FIXTURE_VERSIONS if e in ("vllm", "sglang")]
LLAMACPP = [(e, v) for e, v in FIXTURE_VERSIONS if e == "llamacpp"]


def fixture(engine: str, version: str) -> dict[str, Any]:
    path = FIXTURES / f"{engine}-{version}.json"
    data: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    return data


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
        flag, eq, inline = word.partition("=")
        spec = flags.get(flag)
        if spec is None:
            problems.append(f"{flag}: not a flag of {fx['engine']} {fx['version']}")
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


def engine_args(command: EngineCommand) -> list[str]:
    skip = 1 if command.resolved.engine in ("vllm", "llamacpp") else command.entrypoint_len
    return command.argv[skip:]


def problems_of(engine: str, version: str, command: EngineCommand) -> list[str]:
    fx = fixture(engine, version)
    return check_argv(fx, engine_args(command)) + check_env(fx, command.env)


def models_of(engine: str) -> list[ModelConfig]:
    return [m for m in golden_config().models.values() if m.engine == engine]


# --- the fixtures themselves ----------------------------------------------------------------


@pytest.mark.parametrize(("engine", "version"), CHECKED)
def test_each_fixture_is_the_release_it_claims(engine: str, version: str) -> None:
    fx = fixture(engine, version)
    assert (fx["engine"], fx["version"]) == (engine, version)
    assert len(fx["flags"]) > 100, "a real parser has hundreds of flags"
    assert fx["meta"]["how"]
    assert not [c for c in fx.get("checked", []) if c["result"] != "ok"], (
        "the real parser refused a rendered command line when the fixture was made")


def test_fixtures_say_what_the_versions_table_says() -> None:
    """The table (sparkd/engine/versions.py) and the real parsers agree on the MoE pin."""
    for engine, version in CHECKED:
        if engine != "vllm":
            continue
        fx = fixture(engine, version)
        rules = rules_for("vllm", version).rules
        has_flag = "--moe-backend" in fx["flags"]
        reads_env = "VLLM_FLASHINFER_MOE_BACKEND" in fx["env"]["names"]
        assert has_flag is (rules.moe_pin == "flag"), version
        assert reads_env is bool(rules.moe_env_values), version


# --- every render against every release -----------------------------------------------------


@pytest.mark.parametrize(("engine", "version"), CHECKED)
def test_every_render_is_accepted_by_the_real_parser(engine: str, version: str) -> None:
    config = golden_config()
    checked = 0
    for model in models_of(engine):
        for variant in model.variants:
            for pinned in (replace(model, engine_version=version),
                           replace(model, engine_version=None)):
                detected = version if pinned.engine_version is None else None
                command = engine_command(config, pinned, variant, detected_version=detected)
                assert problems_of(engine, version, command) == [], (model.name, variant)
                checked += 1
    assert checked >= 4


@pytest.mark.parametrize(("engine", "version"), LLAMACPP)
def test_every_llamacpp_render_is_accepted_by_its_source(engine: str, version: str) -> None:
    """llama.cpp: flags and value types read from common/arg.cpp at the build (no binary is
    built here; the fixture's meta says so), EAGLE3's name from common/speculative.cpp."""
    fx = fixture(engine, version)
    assert "derived from llama.cpp's source" in fx["meta"]["how"]
    config = golden_config()
    spec = config.model("qwen3-30b").speculative
    for model in models_of("llamacpp"):
        pinned = replace(model, engine_version=version, speculative=spec)
        for variant in VARIANTS:
            command = engine_command(config, pinned, variant)
            assert problems_of(engine, version, command) == [], (model.name, variant)
    # The old flags are caught: --draft-max is removed, and b11434 renamed eagle3.
    assert check_argv(fx, ["--draft-max", "4"]) == [f"--draft-max: removed in llamacpp {version}"]
    old = engine_command(config, replace(config.model("gemma-3-27b.q4"), engine_version="9093",
                                         speculative=spec), "speculative")
    if version == "11434":
        assert problems_of(engine, version, old) == [
            "--spec-type 'eagle3': not one of the choices " + str(
                fx["flags"]["--spec-type"]["choices"])]


# --- the check fails on a deliberately bad render -------------------------------------------


def test_the_check_catches_an_unknown_flag() -> None:
    """vLLM 0.34's rules (the --moe-backend flag) given to a 0.11.2 parser."""
    config = golden_config()
    model = replace(config.model("vllm-old"), engine_version="0.34.0")
    problems = problems_of("vllm", "0.11.2", engine_command(config, model))
    assert problems == ["--moe-backend: not a flag of vllm 0.11.2"]


def test_the_check_catches_a_wrong_type() -> None:
    config = golden_config()
    model = replace(config.model("vllm-old"), engine_version="0.34.0",
                    args=("--max-model-len", "lots", "--gpu-memory-utilization", "most"))
    problems = problems_of("vllm", "0.34.0", engine_command(config, model))
    assert len(problems) == 2
    assert all("not a value of type" in p for p in problems), problems
    sg = replace(config.model("mistral-7b"), args=("--mem-fraction-static", "high"))
    assert problems_of("sglang", "0.5.23", engine_command(config, sg)) == [
        "--mem-fraction-static 'high': not a value of type float"]


def test_the_check_catches_a_choice_not_offered() -> None:
    """A backend 0.34 offers, rendered for 0.26, which does not offer it."""
    config = golden_config()
    model = replace(config.model("vllm-old"), engine_version="0.26.0",
                    args=("--moe-backend", "rdna3"))
    problems = problems_of("vllm", "0.26.0", engine_command(config, model))
    assert len(problems) == 1 and "'rdna3': not one of the choices" in problems[0]
    assert problems_of("vllm", "0.34.0", engine_command(
        config, replace(model, engine_version="0.34.0"))) == []


def test_the_check_catches_a_variable_the_release_does_not_read() -> None:
    """vLLM 0.11.2's rules (VLLM_FLASHINFER_MOE_BACKEND) given to 0.34.0, which dropped it."""
    config = golden_config()
    model = replace(config.model("vllm-old"), engine_version="0.11.2")
    command = engine_command(config, model)
    assert problems_of("vllm", "0.34.0", command) == [
        "VLLM_FLASHINFER_MOE_BACKEND: not a variable vllm 0.34.0 reads"]
    # ... and sparkd's own render for 0.34.0 has neither problem.
    assert problems_of("vllm", "0.34.0", engine_command(
        config, replace(model, engine_version="0.34.0"))) == []


def test_the_check_catches_a_missing_value_and_a_stray_word() -> None:
    config = golden_config()
    model = replace(config.model("vllm-old"), engine_version="0.34.0",
                    args=("--max-model-len", "--enforce-eager", "stray"))
    problems = problems_of("vllm", "0.34.0", engine_command(config, model))
    assert problems == ["--max-model-len: expected a value",
                        "'stray': an argument no flag takes"]
