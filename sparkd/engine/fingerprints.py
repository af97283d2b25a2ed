"""PURE: known lines in engine logs, as data. `match_lines(lines, engine=...)` finds them.

Each pattern cites the upstream file and the releases it was read from (the published wheels:
vllm 0.11.2, 0.22.1, 0.23.0, 0.26.0, 0.33.0, 0.34.0). The MoE backend fingerprints carry the
backend in `--moe-backend` words (`Match.backend`), so it can be compared with what the model's
pin asks for (`check_moe_backend`, for doctor) and shown in status.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Final, Literal

Severity = Literal["info", "warning", "error"]


def _flag_word(raw: str) -> str:
    """An upstream backend name in `--moe-backend` words: FLASHINFER_TRTLLM ->
    flashinfer_trtllm; vLLM 0.11's FlashinferMoeBackend values CUTLASS / TensorRT-LLM and its
    fp8 path's CUTLASS / TRTLLM -> flashinfer_cutlass / flashinfer_trtllm; the variable's values
    throughput / latency / masked_gemm (sparkd's simulated engine prints those) likewise."""
    word = raw.strip("'\" ").lower().replace("-", "_")
    return {
        "cutlass_fi": "flashinfer_cutlass",
        "tensorrt_llm": "flashinfer_trtllm",
        "throughput": "flashinfer_cutlass",
        "latency": "flashinfer_trtllm",
        "masked_gemm": "flashinfer_cutedsl",
    }.get(word, word)


def _fi_word(raw: str) -> str:
    """vLLM 0.11's words for FlashInfer kernels (the 'FlashInfer' is outside the group)."""
    return {"cutlass": "flashinfer_cutlass", "trtllm": "flashinfer_trtllm",
            "tensorrt_llm": "flashinfer_trtllm"}[raw.lower().replace("-", "_")]


@dataclass(frozen=True, slots=True)
class Fingerprint:
    id: str
    pattern: re.Pattern[str]
    severity: Severity
    meaning: str
    engines: frozenset[str] = frozenset()  # empty: any engine
    source: str = ""  # the upstream file and releases the line was read from
    #: For MoE backend lines: the first group -> the backend in `--moe-backend` words.
    backend: Callable[[str], str] | None = None


@dataclass(frozen=True, slots=True)
class Match:
    fingerprint: Fingerprint
    line: str
    value: str | None  # the first group of the pattern, when it has one

    @property
    def backend(self) -> str | None:
        """The MoE backend the line names, in `--moe-backend` words (None: not such a line)."""
        if self.fingerprint.backend is None or self.value is None:
            return None
        return self.fingerprint.backend(self.value)

    def to_json(self) -> dict[str, str | None]:
        out = {
            "id": self.fingerprint.id,
            "severity": self.fingerprint.severity,
            "meaning": self.fingerprint.meaning,
            "value": self.value,
            "line": self.line,
        }
        if self.fingerprint.backend is not None:
            out["backend"] = self.backend
        return out


def _fp(
    id: str, pattern: str, severity: Severity, meaning: str, engines: Iterable[str] = (),
    *, source: str = "", backend: Callable[[str], str] | None = None, flags: int = 0,
) -> Fingerprint:
    return Fingerprint(id, re.compile(pattern, flags), severity, meaning, frozenset(engines),
                       source, backend)


#: The id of the line that says which MoE backend the engine chose, and of the refusal.
MOE_BACKEND: Final = "moe_backend"
MOE_REFUSED: Final = "moe_backend_refused"

FINGERPRINTS: Final[tuple[Fingerprint, ...]] = (
    # vLLM >= 0.22: one line per quantization's oracle. 0.34 (fused_moe/oracle/base.py
    # make_log_backend): "Using FLASHINFER_TRTLLM NvFp4 MoE backend out of potential backends:
    # [...]."; 0.22.1-0.33.0 (fused_moe/oracle/nvfp4.py, mxfp4.py, wna16) quote the name
    # ("Using 'FLASHINFER_CUTLASS' NvFp4 MoE backend ..."), fp8.py, unquantized.py, int8.py
    # do not ("Using FLASHINFER_CUTLASS Fp8 MoE backend out of ..."). The middle words are the
    # quantization (Fp8, NvFp4, Mxfp4, MxFp8, Unquantized, Int8, W4A8 Int8, WNA16).
    _fp(MOE_BACKEND, r"Using '?([A-Z][A-Z0-9_]*)'? (?:[A-Za-z0-9]+ )+MoE (?:LoRA )?backend\b",
        "info", "the MoE backend vLLM chose", ("vllm",),
        source="vllm 0.22.1-0.33.0 model_executor/layers/fused_moe/oracle/{nvfp4,fp8,mxfp4,"
               "unquantized,int8}.py _make_log_backend; 0.34.0 fused_moe/oracle/base.py "
               "make_log_backend", backend=_flag_word),
    # vLLM 0.11.2: model_executor/layers/quantization/modelopt.py
    # logger.info_once(f"Using FlashInfer {self.flashinfer_moe_backend.value} kernels") with
    # FlashinferMoeBackend values "TensorRT-LLM" / "CUTLASS" (quantization/utils/
    # flashinfer_utils.py), and quantization/fp8.py "Using FlashInfer FP8 MoE TRTLLM backend
    # for SM100" / "Using FlashInfer FP8 MoE CUTLASS backend for SM90/SM100".
    _fp(MOE_BACKEND, r"Using FlashInfer (CUTLASS|TensorRT-LLM) kernels", "info",
        "the FlashInfer MoE kernels vLLM chose", ("vllm",),
        source="vllm 0.11.2 model_executor/layers/quantization/modelopt.py",
        backend=_fi_word),
    _fp(MOE_BACKEND, r"Using FlashInfer FP8 MoE (TRTLLM|CUTLASS) backend", "info",
        "the FlashInfer FP8 MoE kernels vLLM chose", ("vllm",),
        source="vllm 0.11.2 model_executor/layers/quantization/fp8.py", backend=_fi_word),
    # sparkd's simulated engine (sparkd/sim/engine.py) prints the variable's value.
    _fp(MOE_BACKEND, r"Using FlashInfer MoE backend: (\w+)", "info",
        "the FlashInfer MoE backend the engine chose", ("sim",),
        source="sparkd/sim/engine.py", backend=_flag_word),
    # A backend asked for (--moe-backend, or the variable up to 0.23) that cannot run is now
    # refused, not replaced: vllm 0.22.1-0.33.0 fused_moe/oracle/*.py _make_log_unsupported
    # ("NvFp4 MoE backend 'FLASHINFER_TRTLLM' does not support the deployment configuration
    # since ...", fp8.py without the quotes when a reason follows), 0.34.0 oracle/base.py
    # make_log_unsupported. Raised as ValueError: the engine exits.
    _fp(MOE_REFUSED,
        r"MoE (?:LoRA )?backend '?([A-Z][A-Z0-9_]*)'? does not support the deployment "
        r"configuration", "error",
        "vLLM refused the MoE backend it was asked for (--moe-backend or the model's pin): "
        "this GPU or model cannot run it", ("vllm",),
        source="vllm 0.22.1-0.33.0 fused_moe/oracle/*.py _make_log_unsupported; 0.34.0 "
               "fused_moe/oracle/base.py make_log_unsupported", backend=_flag_word),
    # vllm 0.11.2 modelopt.py: "Non-gated MoE is not supported for min-latency mode,falling
    # back to high-throughput mode" (the latency pin replaced by CUTLASS); vllm 0.12.0-0.16.0
    # quantization/utils/flashinfer_utils.py get_flashinfer_moe_backend(): "Flashinfer TRTLLM
    # MOE backend is only supported on SM100 and later, using CUTLASS backend instead" (the
    # variable's latency on a GPU that is not 10.x; sparkd's policy expects it there).
    _fp("moe_latency_fallback", r"(?:not supported for min-latency mode, ?falling back to "
        r"high-throughput mode|TRTLLM MOE backend is only supported on SM100 and later, using "
        r"CUTLASS backend instead)", "warning",
        "vLLM replaced the latency (TensorRT-LLM) MoE kernels with CUTLASS", ("vllm",),
        source="vllm 0.11.2 model_executor/layers/quantization/modelopt.py; 0.12.0-0.16.0 "
               "quantization/utils/flashinfer_utils.py"),
    # vLLM reads only the VLLM_* variables its envs.py knows and warns about the rest: 0.26.0
    # envs.py validate_environ, 0.33.0/0.34.0 platforms/interface.py validate_environ:
    # "Unknown vLLM environment variable detected: %s".
    _fp("unknown_vllm_env", r"Unknown vLLM environment variable detected: (\w+)", "warning",
        "vLLM ignores this variable (this release does not read it)", ("vllm",),
        source="vllm 0.26.0 envs.py; 0.33.0, 0.34.0 platforms/interface.py validate_environ"),
    # vllm 0.23.0 envs.py deprecated_env: "VLLM_FLASHINFER_MOE_BACKEND is deprecated and will
    # be removed in v0.23. Use --moe-backend ..." (a FutureWarning).
    _fp("deprecated_vllm_env", r"(VLLM_\w+) is deprecated and will be removed", "warning",
        "vLLM still reads this variable but will not for long", ("vllm",),
        source="vllm 0.23.0 envs.py deprecated_env"),
    _fp("cuda_oom", r"(CUDA out of memory|OutOfMemoryError|cudaErrorMemoryAllocation)",
        "error", "the engine ran out of GPU memory: lower memory use or free the page cache",
        source="torch (torch.OutOfMemoryError: CUDA out of memory), CUDA runtime",
        flags=re.IGNORECASE),
    _fp("role_alternation",
        r"(Conversation roles must alternate|strict alternation|roles must alternate)",
        "warning", "the chat template demands strict user/assistant alternation: set "
        "role_policy for this model", source="chat templates (FACTS.md)",
        flags=re.IGNORECASE),
    _fp("nccl_error", r"(NCCL error|ncclInternalError|ncclSystemError|ncclUnhandledCudaError)",
        "error", "NCCL failed (multi-GPU / multi-node communication)", source="NCCL",
        flags=re.IGNORECASE),
)


def match_lines(
    lines: Iterable[str], *, engine: str, table: Iterable[Fingerprint] = FINGERPRINTS
) -> list[Match]:
    """Every (fingerprint, line) match, at most one match per fingerprint id (the last)."""
    candidates = [f for f in table if not f.engines or engine in f.engines]
    found: dict[str, Match] = {}
    for line in lines:
        for fp in candidates:
            m = fp.pattern.search(line)
            if m:
                value = m.group(1) if m.groups() else None
                found[fp.id] = Match(fp, line.strip(), value)
    return list(found.values())


def chosen_moe_backend(matches: Iterable[Match]) -> str | None:
    """The MoE backend the engine says it chose, in `--moe-backend` words; None when its log
    said nothing about it (a dense model, or an engine that does not log it)."""
    for m in matches:
        if m.fingerprint.id == MOE_BACKEND:
            return m.backend
    return None


def fatal_match(matches: Iterable[Match]) -> Match | None:
    """A line that means the start failed however healthy the engine looks (today: a refused
    MoE backend). The swap's health gate fails with it as the reason."""
    for m in matches:
        if m.fingerprint.id == MOE_REFUSED:
            return m
    return None


@dataclass(frozen=True, slots=True)
class MoeCheck:
    """What the engine chose against what the model's pin asks for (for doctor)."""

    ok: bool | None  # None: nothing to compare (no pin, or the log named no backend)
    expected: str | None
    chosen: str | None
    message: str


def check_moe_backend(expected: str | None, matches: Iterable[Match]) -> MoeCheck:
    """Compare the backend the pin asks for (`EngineCommand.moe_backend` from
    sparkd.units.render; `auto` or None: vLLM's own choice) with what the log says."""
    found = list(matches)
    refused = fatal_match(found)
    if refused is not None:
        return MoeCheck(ok=False, expected=expected, chosen=None,
                        message=f"vLLM refused the MoE backend {refused.backend}: {refused.line}")
    chosen = chosen_moe_backend(found)
    if expected in (None, "auto"):
        return MoeCheck(None, expected, chosen, f"MoE backend {chosen or 'not logged'} "
                        "(vLLM's own choice)")
    if chosen is None:
        return MoeCheck(None, expected, None, f"the pin asks for {expected}; the engine's log "
                        "names no MoE backend (a dense model, or not started yet)")
    if chosen != expected:
        return MoeCheck(ok=False, expected=expected, chosen=chosen,
                        message=f"the pin asks for {expected}, the engine chose {chosen}")
    return MoeCheck(ok=True, expected=expected, chosen=chosen,
                    message=f"MoE backend {chosen}, as pinned")


def check_moe_backend_json(expected: str | None, fingerprints: Iterable[Mapping[str, Any]]
                           ) -> MoeCheck:
    """`check_moe_backend` on the fingerprints as `sparkctl status` shows them
    (`Match.to_json`), for doctor."""
    matches = []
    for j in fingerprints:
        line, value = str(j.get("line", "")), j.get("value")
        # Several fingerprints share an id (vLLM 0.11's lines name the kernels in their own
        # words): the one whose pattern matches the line reads its value.
        same = [fp for fp in FINGERPRINTS if fp.id == str(j.get("id")) and fp.backend]
        fp = next((fp for fp in same if fp.pattern.search(line)), same[-1] if same else None)
        if fp is not None:
            matches.append(Match(fp, line, None if value is None else str(value)))
    return check_moe_backend(expected, matches)
