"""Every rendered vLLM and SGLang command line and environment, checked against the real
argument parsers of each supported release (sparkd/engine/fixtures/, written by
`make engine-fixtures`: scripts/engine_fixtures.py; the check is sparkd.engine.parsers, which
`sparkd check-config` runs on the user's models too).

The check replays argparse on the recorded parser: an unknown flag, a value the flag's type
does not take, a choice the release does not offer, a missing value, and an environment
variable in the engine's namespace (VLLM_*, SGLANG_*) that the release does not read are all
problems. `test_the_check_catches_*` prove each of those fails on a deliberately bad render.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from test_render import golden_config

from sparkd.config import VARIANTS, ModelConfig
from sparkd.engine.parsers import check_argv, check_env, fixture, recorded
from sparkd.engine.versions import FIXTURE_VERSIONS, rules_for
from sparkd.units.render import EngineCommand, engine_command

CHECKED = [(e, v) for e, v in FIXTURE_VERSIONS if e in ("vllm", "sglang")]
LLAMACPP = [(e, v) for e, v in FIXTURE_VERSIONS if e == "llamacpp"]


def engine_args(command: EngineCommand) -> list[str]:
    skip = 1 if command.resolved.engine in ("vllm", "llamacpp") else command.entrypoint_len
    return command.argv[skip:]


def problems_of(engine: str, version: str, command: EngineCommand) -> list[str]:
    fx = fixture(engine, version)
    return check_argv(fx, engine_args(command)) + check_env(fx, command.env)


def models_of(engine: str) -> list[ModelConfig]:
    return [m for m in golden_config().models.values() if m.engine == engine]


# --- the fixtures themselves ----------------------------------------------------------------


def test_the_recorded_parsers_are_the_table_s_fixture_versions() -> None:
    assert recorded() == sorted(FIXTURE_VERSIONS)


@pytest.mark.parametrize(("engine", "version"), CHECKED)
def test_each_fixture_is_the_release_it_claims(engine: str, version: str) -> None:
    fx = fixture(engine, version)
    assert (fx["engine"], fx["version"]) == (engine, version)
    assert len(fx["flags"]) > 100, "a real parser has hundreds of flags"
    assert fx["meta"]["how"]
    # "ok": parsed and validated; SGLang 0.5.4 validates only with a GPU, so there the real
    # parser's answer is recorded and the validation's refusal is the machine's, not ours.
    refused = [c for c in fx.get("checked", []) if c["result"] != "ok"
               and not c["result"].startswith("parsed; validation needs a GPU here")]
    assert not refused, "the real parser refused a rendered command line"
    assert fx.get("checked") or engine == "llamacpp"


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
