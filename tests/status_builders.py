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
    HealthRecord,
    Status,
    SwapRecord,
    VariantName,
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
