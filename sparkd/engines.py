"""What the daemon knows about each engine (a model's plain or speculative variant), and how
it shows in `sparkctl status`. Pure: values in, values out."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sparkd.config import ModelConfig, Variant
from sparkd.engine.fingerprints import Match, chosen_moe_backend
from sparkd.engine.health import ProbeResult
from sparkd.engine.versions import rules_for
from sparkd.monitor.nvml import NvmlSnapshot
from sparkd.systemd.manager import UnitStatus


@dataclass(slots=True)
class EngineView:
    """What the daemon knows about one engine, refreshed from signals and probes."""

    model: ModelConfig
    unit: UnitStatus
    variant: Variant = "plain"
    health: ProbeResult | None = None
    health_failures: int = 0
    healthy_since: float | None = None
    fingerprints: list[Match] = field(default_factory=list)
    note: str | None = None  # why a speculative variant is not running, say
    # The engine release found installed (sparkd.engine.versions.detect_version); the
    # config's models.NAME.engine_version wins.
    engine_version: str | None = None

    @property
    def unit_name(self) -> str:
        return self.model.unit_for(self.variant)

    @property
    def port(self) -> int:
        return self.model.port_for(self.variant)


def memory_accounting(gpu: NvmlSnapshot | None) -> str:
    """Where the memory figures come from: on unified memory (GB10) NVML has no memory info
    and /proc/meminfo is the truth; on a discrete GPU NVML reports the GPU's own memory."""
    if gpu is None or gpu.error is not None or not gpu.gpus:
        return "/proc/meminfo; no GPU reading"
    if gpu.unified_memory:
        return "unified: /proc/meminfo (NVML memory info not supported)"
    return "discrete: NVML for GPU memory, /proc/meminfo for the host"


def engine_key(model: str, variant: Variant) -> str:
    """The key of an engine in `Supervisor.engines`: the unit's instance name."""
    return model if variant == "plain" else f"{model}:spec"


def model_of_unit(unit: str) -> str | None:
    prefix, suffix = "sparkd-engine@", ".service"
    if unit.startswith(prefix) and unit.endswith(suffix):
        return unit[len(prefix) : -len(suffix)]
    return None


def engine_json(view: EngineView) -> dict[str, Any]:
    u, h = view.unit, view.health
    version = view.model.engine_version or view.engine_version
    return {
        "model": view.model.name,
        "engine": view.model.engine,
        "variant": view.variant,
        "unit": view.unit_name,
        "port": view.port,
        "load_state": u.load_state,
        "active_state": u.active_state,
        "sub_state": u.sub_state,
        "main_pid": u.main_pid,
        "n_restarts": u.n_restarts,
        "result": u.result,
        "health": None
        if h is None
        else {
            "ok": h.ok,
            "status": h.status,
            "error": h.error,
            "latency_ms": round(h.latency_ms, 2),
        },
        "health_failures": view.health_failures,
        "fingerprints": [m.to_json() for m in view.fingerprints],
        # The release the unit was rendered for, and the MoE backend the engine's log says it
        # chose (--moe-backend words; None when it said nothing).
        "engine_version": version,
        # Outside sparkd's table (sparkd/engine/versions.py): which rules were used instead.
        "engine_version_warning": rules_for(view.model.engine, version).warning
        if view.model.engine in ("vllm", "sglang", "llamacpp") else None,
        "moe_backend": chosen_moe_backend(view.fingerprints),
        "note": view.note,
    }
