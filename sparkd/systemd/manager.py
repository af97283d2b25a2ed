"""What sparkd needs from systemd, as a Protocol over plain values.

The real implementation is `sparkd.systemd.bus.PystemdManager`; unit tests use fakes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class UnitStatus:
    name: str
    load_state: str = "not-found"
    active_state: str = "inactive"
    sub_state: str = "dead"
    main_pid: int = 0
    n_restarts: int = 0
    result: str = "success"
    exec_main_status: int = 0

    @property
    def running(self) -> bool:
        """Active or on its way: a unit sparkd must not start again (it adopts it)."""
        return self.active_state in ("active", "activating", "reloading")


@dataclass(frozen=True, slots=True)
class JobDone:
    """A finished systemd job (the JobRemoved signal)."""

    job_id: int
    unit: str
    result: str  # done, canceled, timeout, failed, dependency, skipped


@dataclass(frozen=True, slots=True)
class UnitChanged:
    """A unit's properties changed (the PropertiesChanged signal)."""

    unit: str


SystemdEvent = JobDone | UnitChanged


class SystemdManager(Protocol):
    """Blocking calls to PID 1. The daemon runs them in its systemd executor thread."""

    def version(self) -> int: ...

    def daemon_reload(self) -> None: ...

    def start_unit(self, name: str) -> str: ...

    def stop_unit(self, name: str) -> str: ...

    def restart_unit(self, name: str) -> str: ...

    def reset_failed_unit(self, name: str) -> None: ...

    def unit_status(self, name: str) -> UnitStatus: ...


class SystemdSignals(Protocol):
    """Signals from PID 1, delivered on the event loop through the bus's file descriptor."""

    def attach(self, on_event: Callable[[SystemdEvent], None]) -> None: ...

    def close(self) -> None: ...
