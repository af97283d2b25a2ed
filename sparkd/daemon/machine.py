"""The status document's `machine` record (docs/watch.md "Shown and exported"): the memory
floor, each running engine's memory, the desktop watch's readings and what the watch did. Read
from the Supervisor's watch when status is asked for; the only reads of the machine are each
running engine's cgroup memory.current (one small file per engine)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from sparkd.control.status import MachineRecord
from sparkd.monitor.floor import GIB

if TYPE_CHECKING:
    from sparkd.daemon.supervisor import Supervisor


def engine_memory(sup: Supervisor) -> dict[str, int]:
    """Each running engine's memory (its cgroup's memory.current), by engine key (the unit's
    instance name); engines whose memory cannot be read are left out."""
    read = sup.watch.engine_memory
    if read is None:
        return {}
    out: dict[str, int] = {}
    for name, view in sorted(sup.engines.items()):
        if view.unit.running and view.unit.main_pid:
            current = read(view.unit.main_pid)
            if current is not None:
                out[name] = current
    return out


def machine_record(sup: Supervisor) -> MachineRecord:
    watch = sup.watch
    floor_gib = sup.config.daemon.memory_floor_gib
    return MachineRecord(
        floor_bytes=int(floor_gib * GIB) if floor_gib > 0 else None,
        engine_memory_bytes=engine_memory(sup),
        lateness_p99_ms=watch.lateness_p99_ms,
        desktop=watch.desktop,
        actions=tuple(watch.actions.recent),
        action_counts=dict(watch.actions.counts),
        swaps=dict(watch.actions.swaps),
    )
