"""What sparkd needs from systemd, as a Protocol over plain values.

The real implementation is `sparkd.systemd.bus.PystemdManager`; unit tests use fakes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Final, Protocol


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


#: What systemd reports for a weight or a memory limit that is not set (UINT64_MAX).
UNSET: Final = (1 << 64) - 1


@dataclass(frozen=True, slots=True)
class ResourceWeights:
    """A service's or slice's CPUWeight=, IOWeight= and MemoryHigh= (UNSET: not set; the
    desktop ladder, docs/watch.md)."""

    cpu_weight: int = UNSET
    io_weight: int = UNSET
    memory_high: int = UNSET


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

    def resource_weights(self, name: str) -> ResourceWeights: ...

    def set_resource_weights(self, name: str, weights: ResourceWeights) -> None: ...

    def session_types(self) -> list[str] | None: ...


class SystemdSignals(Protocol):
    """Signals from PID 1, delivered on the event loop through the bus's file descriptor."""

    def attach(self, on_event: Callable[[SystemdEvent], None]) -> None: ...

    def close(self) -> None: ...
