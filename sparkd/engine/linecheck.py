"""Every supervised model's engine command line and environment, the user's `args` and `env`
included, checked against the real parser of its engine release (sparkd.engine.parsers), for
`sparkd check-config`. Errors name the file, the model's key and the fix; a release outside
the versions table, or one whose parser is not recorded, is a warning (nothing to check
against). Pure once the fixtures are read: the caller gives the detected versions and the
GPU's compute capability.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sparkd.config import Config, ModelConfig
from sparkd.engine.argforms import flag_value, llama_word, vllm_word
from sparkd.engine.parsers import (
    REPLACEMENTS,
    check_argv,
    check_env,
    fixture,
    fixture_for,
)
from sparkd.engine.version_form import FORMS, escaped
from sparkd.engine.versions import (
    MOE_BACKEND_ENV,
    MOE_BACKEND_FLAG,
    MOE_ENV_TO_FLAG,
    MOE_FLAG_TO_ENV,
    TABLE,
    model_version,
    rules_for,
)
from sparkd.errors import ConfigError
from sparkd.units.render import EngineCommand, engine_command, speculative_args

ENGINES = ("vllm", "sglang", "llamacpp")


@dataclass(slots=True)
class LineReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def refuse_bad_lines(config: Config, detected: Mapping[str, str] | None = None,
                     capability: tuple[int, int] | None = None) -> LineReport:
    """check_lines, with its errors raised as one ConfigError (check-config, and the daemon's
    reload: a file whose engine lines a real parser refuses is refused everywhere); the
    report's warnings are the caller's to say."""
    report = check_lines(config, detected, capability)
    if report.errors:
        raise ConfigError("\n".join(report.errors))
    return report


def engine_args(command: EngineCommand) -> list[str]:
    """The words a parser sees: vLLM's from `serve` on, SGLang's and llama.cpp's after the
    program and entrypoint."""
    skip = 1 if command.resolved.engine in ("vllm", "llamacpp") else command.entrypoint_len
    return command.argv[skip:]


def version_hint(model: ModelConfig, detected: str | None) -> str:
    """The fix that pins a model's engine release: the detected one where there is one, else
    the form the engine's versions take."""
    if detected is not None:
        return f'engine_version = "{escaped(detected)}" in models.{model.name} (the release ' \
               "detected)"
    return (f'engine_version = "RELEASE" in models.{model.name}, RELEASE being '
            f"{FORMS[model.engine]}: the release installed")


def outside_fix(model: ModelConfig, version: str | None, detected: str | None,
                source: object) -> str:
    """The fix for a release outside the versions table: pin it when it is not known (in the
    engine's own form, the detected value when there is one); a release sparkd does not know
    is not fixed by pinning it."""
    if version is None:
        return version_hint(model, detected)
    rule_sets, newest = TABLE[model.engine]
    return (f"install a release sparkd knows ({model.engine} {rule_sets[0].since} to {newest}), "
            f"or check the rendered line against the engine's --help: sparkctl units --config "
            f"{source}")


def check_lines(
    config: Config, detected: Mapping[str, str] | None = None,
    capability: tuple[int, int] | None = None,
) -> LineReport:
    report = LineReport()
    for model in config.supervised_models:
        if model.engine in ENGINES:
            _check_model(config, model, (detected or {}).get(model.name), capability, report)
    return report


def _check_model(config: Config, model: ModelConfig, detected: str | None,
                 capability: tuple[int, int] | None, report: LineReport) -> None:
    where = f"{config.source}: models.{model.name}"
    version = model_version(model, {model.name: detected} if detected else None)
    resolved = rules_for(model.engine, version)
    rules = resolved.rules
    moe_refused = False
    if model.engine == "vllm":
        value = model.env_dict.get(MOE_BACKEND_ENV)
        takes = rules.moe_env_values if rules.moe_pin == "env" else tuple(MOE_ENV_TO_FLAG)
        if value is not None and value not in takes:
            moe_refused = True
            report.errors.append(
                f"{where}.env.{MOE_BACKEND_ENV}: \"{escaped(value)}\" is not a value vLLM "
                f"{resolved.version or rules.since + '+'} takes (it takes: {', '.join(takes)}); "
                f"fix: set one of them, or remove the key (sparkd then pins the MoE backend "
                f"for this GPU)")
    try:
        engine_command(config, model, detected_version=detected, capability=capability)
    except ConfigError as exc:
        if not moe_refused:
            report.errors.append(exc.message)
        return
    if not resolved.known:
        report.warnings.append(f"{where}: {resolved.warning}; its command line is not checked "
                               "against the engine's parser; fix: "
                               + outside_fix(model, version, detected, config.source))
        return
    assert version is not None
    release = fixture_for(model.engine, version)
    if release is None:
        report.warnings.append(f"{where}: no parser of {model.engine} {version} is recorded "
                               "(sparkd/engine/fixtures/): its command line is not checked")
        return
    fx = fixture(model.engine, release)
    seen: set[str] = set()
    for variant in model.variants:
        command = engine_command(config, model, variant, detected_version=detected,
                                 capability=capability)
        spec = speculative_args(model, resolved) if variant == "speculative" else []
        problems = check_argv(fx, engine_args(command)) + check_env(fx, command.env)
        for problem in problems:
            line = _explain(where, model, resolved.version or version, problem, spec)
            if line not in seen and not _is_moe_env(problem, model):
                seen.add(line)
                report.errors.append(line)


def _is_moe_env(problem: str, model: ModelConfig) -> bool:
    """The MoE variable's own error is given above; not twice."""
    return problem.startswith(MOE_BACKEND_ENV + ":") and \
        model.env_dict.get(MOE_BACKEND_ENV) not in MOE_ENV_TO_FLAG


def _token(problem: str) -> str:
    head = problem.split(":", 1)[0].split(" ", 1)[0]
    return head.strip("'\"")


def _explain(where: str, model: ModelConfig, version: str, problem: str,
             spec: list[str]) -> str:
    token = _token(problem)
    normal = {"llamacpp": llama_word, "vllm": vllm_word}.get(model.engine, str)
    args = [normal(a) for a in model.args]
    in_args = any(a == token or a.startswith(token + "=") for a in args)
    engine = f"{model.engine} {version}"
    if token in model.env_dict:
        key, fix = f"{where}.env.{token}", f"remove it from models.{model.name}.env"
        problem = problem.removeprefix(f"{token}: ")
    elif in_args:
        key = f"{where}.args"
        if token == MOE_BACKEND_FLAG and model.engine == "vllm" and "not a flag of" in problem:
            value = MOE_FLAG_TO_ENV.get(flag_value(model.args, token) or "", "latency")
            fix = (f"vLLM {version} reads the MoE pin from a variable, not a flag: remove "
                   f'it from args and set env = {{ {MOE_BACKEND_ENV} = "{value}" }} in '
                   f"models.{model.name}")
        elif "no --flag=value form" in problem:
            flag, value = token.split("=", 1)
            fix = (f'write it as two words in models.{model.name}.args: "{escaped(flag)}", '
                   f'"{escaped(value)}"')
        elif "removed in" in problem:
            fix = (f"use {REPLACEMENTS[token]} instead" if token in REPLACEMENTS
                   else f"remove it from models.{model.name}.args")
        elif "not a flag of" in problem:
            fix = (f"remove it from models.{model.name}.args, or pin the release that has it "
                   f"(models.{model.name}.engine_version)")
        else:
            fix = f"correct it in models.{model.name}.args"
    elif token in spec:
        key, fix = f"{where}.speculative", f"models.{model.name}.speculative for {engine}"
    else:
        key = f"{where}.engine_version"
        fix = (f"sparkd rendered this for {engine}: check that models.{model.name}"
               ".engine_version is the release installed")
    return f"{key}: {escaped(problem)}; fix: {fix}"
