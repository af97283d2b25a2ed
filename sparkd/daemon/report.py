"""PURE: the daemon's status as the schema's records (`sparkd.control.status`), and the
one-line STATUS= systemd shows. The Supervisor hands in its state; nothing here reads the
machine."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from sparkd.control.status import (
    DaemonRecord,
    DaemonStateName,
    EngineRecord,
    FailureRecord,
    FingerprintRecord,
    GpuProcessRecord,
    GpuRecord,
    GpusRecord,
    HealthRecord,
    MachineRecord,
    MemoryRecord,
    PressureRecord,
    ReloadRecord,
    Status,
    StepRecord,
    SwapRecord,
)
from sparkd.daemon.engines import EngineView
from sparkd.engine.fingerprints import Match, chosen_moe_backend
from sparkd.engine.probe import ProbeResult
from sparkd.engine.swap import SwapRun
from sparkd.engine.versions import rules_for
from sparkd.monitor.memory import MemInfo
from sparkd.monitor.nvml import NvmlSnapshot
from sparkd.monitor.psi import Pressure
from sparkd.state import State


def swap_record(run: SwapRun) -> SwapRecord:
    return SwapRecord(
        id=run.id,
        from_model=run.plan.from_model,
        to=run.plan.target,
        reason=run.reason,
        step=run.step.value,
        started_at=run.started_at,
        duration_ms=round(run.duration_ms, 1),
        rollback_to=run.plan.rollback_to,
        failure=run.failure,
        steps=tuple(StepRecord(step=r.step.value, ok=r.ok,
                               duration_ms=round(r.duration_ms, 1), detail=r.detail)
                    for r in run.history),
    )


def health_record(h: ProbeResult) -> HealthRecord:
    return HealthRecord(ok=h.ok, status=h.status, error=h.error,
                        latency_ms=round(h.latency_ms, 2))


def fingerprint_record(m: Match) -> FingerprintRecord:
    return FingerprintRecord(id=m.fingerprint.id, severity=m.fingerprint.severity,
                             meaning=m.fingerprint.meaning, value=m.value, line=m.line)


def engine_record(view: EngineView) -> EngineRecord:
    u = view.unit
    version = view.release
    return EngineRecord(
        model=view.model.name,
        engine=view.model.engine,
        variant=view.variant,
        unit=view.unit_name,
        port=view.port,
        load_state=u.load_state,
        active_state=u.active_state,
        sub_state=u.sub_state,
        main_pid=u.main_pid,
        n_restarts=u.n_restarts,
        result=u.result,
        health=None if view.health is None else health_record(view.health),
        health_failures=view.health_failures,
        fingerprints=tuple(fingerprint_record(m) for m in view.fingerprints),
        note=view.note,
        engine_version=version,
        engine_version_warning=rules_for(view.model.engine, version).warning
        if view.model.engine in ("vllm", "sglang", "llamacpp") else None,
        moe_backend=chosen_moe_backend(view.fingerprints),
    )


def memory_accounting(gpu: NvmlSnapshot | None) -> str:
    """Where the memory figures come from: on unified memory (GB10) NVML has no memory info
    and /proc/meminfo is the truth; on a discrete GPU NVML reports the GPU's own memory."""
    if gpu is None or gpu.error is not None or not gpu.gpus:
        return "/proc/meminfo; no GPU reading"
    if gpu.unified_memory:
        return "unified: /proc/meminfo (NVML memory info not supported)"
    return "discrete: NVML for GPU memory, /proc/meminfo for the host"


def memory_record(mem: MemInfo | str, gpu: NvmlSnapshot | None) -> MemoryRecord:
    """`mem` is the reading, or why there is none."""
    if isinstance(mem, str):
        return MemoryRecord(error=mem)
    return MemoryRecord(total_bytes=mem.total, available_bytes=mem.available,
                        page_cache_bytes=mem.page_cache, accounting=memory_accounting(gpu))


def pressure_record(p: Pressure) -> PressureRecord:
    return PressureRecord(
        some_avg10=p.some.avg10, some_avg60=p.some.avg60,
        full_avg10=None if p.full is None else p.full.avg10,
        full_avg60=None if p.full is None else p.full.avg60,
    )


def gpus_record(snap: NvmlSnapshot) -> GpusRecord:
    return GpusRecord(
        driver=snap.driver, error=snap.error, unified_memory=snap.unified_memory,
        gpus=tuple(GpuRecord(
            index=g.index, name=g.name, uuid=g.uuid, memory_total_bytes=g.memory_total,
            memory_used_bytes=g.memory_used, utilization_pct=g.utilization_pct,
            temperature_c=g.temperature_c, power_w=g.power_w,
            processes=tuple(GpuProcessRecord(pid=p.pid, used_bytes=p.used_bytes)
                            for p in g.processes),
            process_bytes=g.process_bytes, unsupported=g.unsupported,
            memory_utilization_pct=g.memory_utilization_pct,
        ) for g in snap.gpus),
    )


def active_model(desired: str | None, engines: Mapping[str, EngineView]) -> str | None:
    """The desired model when its unit is active, else the first plain engine that is."""
    if desired is not None and desired in engines and (
            engines[desired].unit.active_state == "active"):
        return desired
    for name, view in sorted(engines.items()):
        if view.variant == "plain" and view.unit.active_state == "active":
            return name
    return None


def status_line(daemon_state: DaemonStateName, desired: str | None, run: SwapRun | None,
                engines: Mapping[str, EngineView], last_reload: ReloadRecord | None,
                conditions: Iterable[str] = ()) -> str:
    """The one line `systemctl status sparkd` shows (STATUS=)."""
    if daemon_state != "running":
        return daemon_state
    if run is not None and run.plan.from_model is None:
        line = f"starting {run.plan.target}: {run.step}"
    elif run is not None:
        line = f"swapping {run.plan.from_model} -> {run.plan.target}: {run.step}"
    elif desired is None:
        # True after an unload and after a failed start with nothing to roll back to alike;
        # the last failure (status, doctor) says which.
        line = "nothing serves: no model is desired"
    elif desired not in engines:
        line = f"{desired}: not a supervised model"
    else:
        view = engines[desired]
        u = view.unit
        if u.active_state == "active":
            health = "healthy" if view.health and view.health.ok else "health unknown"
            if view.health and not view.health.ok:
                health = f"unhealthy ({view.health_failures} failed checks)"
            line = f"{desired}: serving, {health}"
        else:
            line = f"{desired}: {u.active_state} ({u.sub_state})"
    if last_reload and not last_reload.ok:
        line += " · config reload failed, previous config kept"
    for condition in conditions:
        line += f" · {condition}"
    return line


def build_status(
    *,
    daemon: DaemonRecord,
    state: State,
    engines: Mapping[str, EngineView],
    swap_run: SwapRun | None,
    last_swap: SwapRun | None,
    memory: MemoryRecord,
    pressure: Mapping[str, Pressure],
    gpu: NvmlSnapshot | None,
    machine: MachineRecord | None = None,
) -> Status:
    return Status(
        daemon=daemon,
        desired_model=state.desired_model,
        active_model=active_model(state.desired_model, engines),
        last_good_model=state.last_good_model,
        swap=None if swap_run is None else swap_record(swap_run),
        last_swap=None if last_swap is None else swap_record(last_swap),
        last_failure=None if state.last_failure_model is None else FailureRecord(
            model=state.last_failure_model, reason=state.last_failure_reason),
        engines=tuple(engine_record(v) for _, v in sorted(engines.items())),
        memory=memory,
        pressure={name: pressure_record(p) for name, p in pressure.items()},
        gpu=None if gpu is None else gpus_record(gpu),
        machine=machine,
    )


def describe_units(result: Mapping[str, Iterable[str]]) -> str:
    parts = []
    for key in ("written", "removed"):
        items = list(result.get(key) or [])
        if items:
            parts.append(f"{key} {', '.join(items)}")
    return "; ".join(parts) or "no change"
