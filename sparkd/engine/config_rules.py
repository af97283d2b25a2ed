"""PURE: the checks of a model's config that need engine knowledge, for sparkd.config (which
calls them while parsing, so a file that fails them is refused and sparkd runs on the last
accepted copy, at start and on reload alike)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from packaging.version import Version

from sparkd.config_checks import Validator
from sparkd.engine.argforms import llama_word, vllm_word
from sparkd.engine.version_form import FORMS, parse_version

#: Every value of VLLM_FLASHINFER_MOE_BACKEND some vLLM release takes: vllm 0.11.2 envs.py
#: throughput, latency; 0.12.0-0.23.0 envs.py add masked_gemm (0.24+ read the flag, which
#: sparkd renders from these three).
MOE_ENV_VALUES: Final = ("latency", "throughput", "masked_gemm")
MOE_ENV_VALUES_0_11: Final = ("latency", "throughput")
MOE_ENV: Final = "VLLM_FLASHINFER_MOE_BACKEND"
#: The flags by which sparkd gives each engine the model's weights and name (its gateway routes
#: by the name, prestart and doctor check `path`): a model's own would win (the engines keep
#: the last) behind sparkd's back. From the recorded parsers (sparkd/engine/fixtures/: vLLM
#: 0.11.2-0.34.0, SGLang 0.5.4 and 0.5.23, llama.cpp b9093 and b11434).
OWN_FLAGS: Final[Mapping[str, tuple[str, ...]]] = {
    "vllm": ("--model", "--served-model-name"),
    "sglang": ("--model", "--model-path", "--served-model-name"),
    "llamacpp": ("-m", "--model", "-a", "--alias"),
}
#: A file of more flags, read by the engine itself (vLLM `--config` YAML: vllm
#: engine/arg_utils.py / utils FlexibleArgumentParser; SGLang `--config`, in both recorded
#: parsers): what it sets (host, port, the MoE backend, the weights) no check of sparkd's sees.
CONFIG_FILE_FLAGS: Final[Mapping[str, tuple[str, ...]]] = {
    "vllm": ("--config",),
    "sglang": ("--config",),
}
#: The speculative methods llama.cpp has: EAGLE3 alone at b9093 and b11434
#: (common/speculative.cpp; sparkd.engine.versions spec_types, where the flag's words are).
LLAMACPP_METHODS: Final = ("eagle3",)


def check_engine(v: Validator, key: str, engine: str, version: str | None,
                 env: Mapping[str, str], method: str | None = None,
                 args: Sequence[str] = ()) -> None:
    """`engine_version` in the engine's own form; a vLLM MoE pin variable with a value some
    release takes; a speculative `method` the engine has (llama.cpp: eagle3); no flag in
    `args` that would replace the weights or name sparkd gives the engine."""
    read = {"vllm": vllm_word, "llamacpp": llama_word}.get(engine, str)
    for word in args:
        flag = read(word).split("=", 1)[0]
        # argparse (vLLM, SGLang) also takes a unique prefix: --served-model.
        prefix = engine != "llamacpp" and flag.startswith("--") and len(flag) > 3
        own = [f for f in OWN_FLAGS.get(engine, ())
               if f == flag or (prefix and f.startswith(flag))]
        hidden = [f for f in CONFIG_FILE_FLAGS.get(engine, ())
                  if f == flag or (prefix and f.startswith(flag))]
        if hidden:
            v.fail(f"{key}.args", f"no {hidden[0]} (a file of flags the engine reads "
                   "behind every check of sparkd's: its host, port, MoE backend or weights "
                   f"would go unchecked; write those flags in {key}.args instead)", word)
        if own:
            v.fail(f"{key}.args", f"no {own[0]} (sparkd passes the weights, {key}.path, and "
                   f"the name the gateway routes by, {key.split('.', 1)[-1]}: change those "
                   "instead)", word)
    if engine == "llamacpp" and method is not None and method not in LLAMACPP_METHODS:
        v.fail(f"{key}.speculative.method", ", ".join(f'"{m}"' for m in LLAMACPP_METHODS) + " "
               "(llama.cpp speculates with EAGLE3 only: common/speculative.cpp)", method)
    if version is not None:
        if engine not in FORMS:
            v.fail(f"{key}.engine_version", "nothing (vllm, sglang and llamacpp only)", version)
        try:
            parse_version(engine, version)
        except ValueError:
            v.fail(f"{key}.engine_version", FORMS[engine], version)
    value = env.get(MOE_ENV)
    if engine != "vllm" or value is None:
        return
    takes: tuple[str, ...] = MOE_ENV_VALUES
    which = "a vLLM release takes"
    if version is not None:
        old = parse_version("vllm", version) < Version("0.12.0rc0")
        takes = MOE_ENV_VALUES_0_11 if old else MOE_ENV_VALUES
        which = f"vLLM {version} takes"
    if value not in takes:
        v.fail(f"{key}.env.{MOE_ENV}", f"a value {which} ({', '.join(takes)}), or no key "
               "(sparkd then pins the backend for this GPU)", value)
