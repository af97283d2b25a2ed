"""Daemon messages for tests, built with the schema's own constructors
(`sparkd.control.status`), never as hand-written dicts: what a fake daemon says has the shape
the real one sends. Defaults are those of a healthy simulated engine."""

from __future__ import annotations

import dataclasses
from typing import Any

from sparkd.control.status import (
    DaemonRecord,
    EngineRecord,
    Event,
    EventName,
    GpuRecord,
    GpusRecord,
    HealthRecord,
    MachineRecord,
    MemoryRecord,
    PressureRecord,
    Status,
    SwapRecord,
    VariantName,
    WatchActionRecord,
)
from sparkd.engine.unit import unit_name


def daemon(**changes: Any) -> DaemonRecord:
    record = DaemonRecord(state="running", status_line="", pid=1, version="0.1.0",
                          uptime_s=1.0, started_at=0.0, config="/etc/sparkd.toml",
                          systemd_version=252)
    return dataclasses.replace(record, **changes)


def engine(model: str, port: int, *, active_state: str = "active", healthy: bool = True,
           variant: VariantName = "plain", **changes: Any) -> EngineRecord:
    record = EngineRecord(
        model=model, engine="sim", variant=variant, unit=unit_name(model, variant), port=port,
        load_state="loaded", active_state=active_state,
        sub_state="running" if active_state == "active" else "start",
        main_pid=1, n_restarts=0, result="success",
        health=HealthRecord(ok=healthy, status=200 if healthy else 503, error=None,
                            latency_ms=1.0))
    return dataclasses.replace(record, **changes)


def swap(to: str, *, from_model: str | None = None, step: str = "start", id: int = 1,
         **changes: Any) -> SwapRecord:
    record = SwapRecord(id=id, from_model=from_model, to=to, reason="requested", step=step,
                        started_at=1.0, duration_ms=0.0, rollback_to=from_model, failure=None)
    return dataclasses.replace(record, **changes)


def status(*, engines: tuple[EngineRecord, ...] | list[EngineRecord] = (),
           active_model: str | None = None, swap: SwapRecord | None = None,
           **changes: Any) -> Status:
    record = Status(daemon=daemon(), desired_model=active_model, active_model=active_model,
                    last_good_model=None, swap=swap, engines=tuple(engines))
    return dataclasses.replace(record, **changes)


def event(name: EventName, status: Status, *, swap: SwapRecord | None = None) -> Event:
    return Event(event=name, status=status, swap=swap)


GIB = 1 << 30


def memory(total_gib: float = 128, available_gib: float = 40, cache_gib: float = 20,
           **changes: Any) -> MemoryRecord:
    record = MemoryRecord(total_bytes=int(total_gib * GIB),
                          available_bytes=int(available_gib * GIB),
                          page_cache_bytes=int(cache_gib * GIB),
                          accounting="unified: /proc/meminfo (NVML memory info not supported)")
    return dataclasses.replace(record, **changes)


def pressure(some: float = 1.0, full: float | None = 0.5) -> PressureRecord:
    return PressureRecord(some_avg10=some, some_avg60=some, full_avg10=full, full_avg60=full)


def gpu(**changes: Any) -> GpusRecord:
    """One GB10-shaped GPU (memory info not supported: unified memory)."""
    record = GpuRecord(index=0, name="NVIDIA GB10", uuid="GPU-0", memory_total_bytes=None,
                       memory_used_bytes=None, utilization_pct=87, temperature_c=61,
                       power_w=48.25, processes=(), process_bytes=0,
                       unsupported=("memory",), memory_utilization_pct=3)
    return GpusRecord(driver="580.95.05", error=None, unified_memory=True,
                      gpus=(dataclasses.replace(record, **changes),))


def action(kind: str = "memory_floor_stop", model: str = "a", at: float = 0.0,
           detail: str = "stopped") -> WatchActionRecord:
    return WatchActionRecord(kind=kind, model=model, at=at, detail=detail)


def machine(**changes: Any) -> MachineRecord:
    record = MachineRecord(floor_bytes=4 * GIB, engine_memory_bytes={"a": 60 * GIB},
                           lateness_p99_ms=None, desktop="unknown")
    return dataclasses.replace(record, **changes)
