"""PURE: known lines in engine logs, as data. `match_lines(lines, engine=...)` finds them.

Sources: vLLM's FlashInfer MoE selection logs "Using FlashInfer CUTLASS kernels for ..." for
the throughput backend and "Using FlashInfer TensorRT-LLM kernels for ..." for latency
(vllm/model_executor/layers/quantization/modelopt.py); on sm121 the TRT-LLM path is only taken
on the sm100 family and vLLM falls back to CUTLASS (FACTS.md). The simulated engine prints
"Using FlashInfer MoE backend: X". CUDA OOM, strict role alternation and NCCL errors are the
failure modes of the seed postmortem.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Final, Literal

Severity = Literal["info", "warning", "error"]


@dataclass(frozen=True, slots=True)
class Fingerprint:
    id: str
    pattern: re.Pattern[str]
    severity: Severity
    meaning: str
    engines: frozenset[str] = frozenset()  # empty: any engine


@dataclass(frozen=True, slots=True)
class Match:
    fingerprint: Fingerprint
    line: str
    value: str | None  # the first group of the pattern, when it has one

    def to_json(self) -> dict[str, str | None]:
        return {
            "id": self.fingerprint.id,
            "severity": self.fingerprint.severity,
            "meaning": self.fingerprint.meaning,
            "value": self.value,
            "line": self.line,
        }


def _fp(
    id: str, pattern: str, severity: Severity, meaning: str, engines: Iterable[str] = ()
) -> Fingerprint:
    return Fingerprint(id, re.compile(pattern, re.IGNORECASE), severity, meaning,
                       frozenset(engines))


FINGERPRINTS: Final[tuple[Fingerprint, ...]] = (
    _fp("moe_backend", r"Using FlashInfer (CUTLASS|TensorRT-LLM) kernels for", "info",
        "the FlashInfer MoE kernels vLLM chose (CUTLASS: throughput, TensorRT-LLM: latency)",
        ("vllm",)),
    _fp("moe_backend", r"Using FlashInfer MoE backend: (\w+)", "info",
        "the FlashInfer MoE backend the engine chose", ("vllm", "sim")),
    _fp("moe_cutlass_fallback", r"fall(?:s|ing)? ?back to (?:FlashInfer )?CUTLASS", "warning",
        "the latency (TensorRT-LLM) MoE path is not available on this GPU; CUTLASS is used",
        ("vllm", "sim")),
    _fp("cuda_oom", r"(CUDA out of memory|OutOfMemoryError|cudaErrorMemoryAllocation)",
        "error", "the engine ran out of GPU memory: lower memory use or free the page cache"),
    _fp("role_alternation",
        r"(Conversation roles must alternate|strict alternation|roles must alternate)",
        "warning", "the chat template demands strict user/assistant alternation: set "
        "role_policy for this model"),
    _fp("nccl_error", r"(NCCL error|ncclInternalError|ncclSystemError|ncclUnhandledCudaError)",
        "error", "NCCL failed (multi-GPU / multi-node communication)"),
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
