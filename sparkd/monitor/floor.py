"""The memory floor: stop the engine that grows before unified memory runs out and the host
wedges. Pure rules over readings; the daemon's adapter (sparkd.daemon.watch) reads
/proc/meminfo and the engines' cgroups and stops the unit.

On a DGX Spark an engine that keeps allocating (a KV cache sized for a GPU it does not have, a
leak, a second model loaded beside the first) takes the whole host with it: the kernel's OOM
killer comes too late or not at all for memory the GPU driver holds, and the machine needs a
power cycle (vLLM issue 46307; dgx-spark-playbooks 97 and 116). People write watchdogs that kill
the engine when `MemAvailable` falls under a floor; this is that watchdog, inside the supervisor
that knows which engine is which.

    sample: MemAvailable >= floor ........................ count back to 0
            MemAvailable <  floor ........................ count + 1
            count reaches `samples` ...................... trip: stop the engine that grew most
                                                           (count back to 0)

`FloorRule.disabled` (floor 0) never trips. Which engine: the one whose cgroup `memory.current`
grew most since its baseline (read on the slower health timer); with no growth to tell them
apart, the one that holds the most. An engine without a reading is never picked while another
has one.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

KIB: Final = 1024
GIB: Final = 1 << 30
_KEY: Final = "MemAvailable:"
PAGE: Final = os.sysconf("SC_PAGE_SIZE")


class FloorReadError(ValueError):
    """A /proc/meminfo text without a MemAvailable line."""


def available_bytes(meminfo_text: str) -> int:
    """MemAvailable in bytes from /proc/meminfo's text: the one field the floor needs, found
    without parsing the other fifty lines (this runs several times a second)."""
    at = meminfo_text.find(_KEY)
    if at < 0:
        raise FloorReadError("meminfo: no MemAvailable line (not a Linux 3.14+ /proc/meminfo?)")
    end = meminfo_text.find("\n", at)
    fields = meminfo_text[at + len(_KEY): end if end >= 0 else None].split()
    try:
        value = int(fields[0])
    except (IndexError, ValueError):
        raise FloorReadError(f"meminfo: MemAvailable line unreadable: {fields!r}") from None
    return value * KIB if fields[1:2] == ["kB"] else value


@dataclass(frozen=True, slots=True)
class FloorRule:
    floor_bytes: int  # 0: disabled
    samples: int = 3  # consecutive readings under the floor before it trips

    @property
    def disabled(self) -> bool:
        return self.floor_bytes <= 0


@dataclass(frozen=True, slots=True)
class FloorCount:
    under: int = 0  # consecutive readings under the floor so far
    trip: bool = False  # this reading was the last one: stop the engine that grows
    first_under_t: float | None = None  # when the current run under the floor began


def floor_step(count: FloorCount, rule: FloorRule, available: int, t: float) -> FloorCount:
    """One reading of MemAvailable at monotonic time `t`: the count after it."""
    if rule.disabled or available >= rule.floor_bytes:
        return FloorCount()
    under = count.under + 1
    first = count.first_under_t if count.first_under_t is not None else t
    if under >= rule.samples:
        return FloorCount(under=0, trip=True, first_under_t=first)
    return FloorCount(under=under, first_under_t=first)


# The fastest memory is assumed to go: above the page supply measured on the development
# machines (0.7 GiB/s in a 2-core VM, bench/RESULTS.md) and a CUDA engine's KV-cache
# allocation on unified memory (several GiB/s). Far above the floor, the next reading can wait
# as long as this ramp would take to reach it.
FASTEST_RAMP_BYTES_PER_S: Final = 8 * GIB
SLOWEST_PERIOD_S: Final = 1.0


def next_reading_in(available: int, rule: FloorRule, period_s: float) -> float:
    """Seconds until the next reading: `period_s` near the floor; further from it, as long as
    the fastest ramp would need to reach it, up to SLOWEST_PERIOD_S. Never longer than
    `period_s` once under the floor (the count must run at the configured pace)."""
    if rule.disabled:
        return max(period_s, SLOWEST_PERIOD_S)
    headroom = available - rule.floor_bytes
    if headroom <= 0:
        return period_s
    return min(max(period_s, headroom / FASTEST_RAMP_BYTES_PER_S), max(period_s,
                                                                         SLOWEST_PERIOD_S))


@dataclass(frozen=True, slots=True)
class EngineMemory:
    current: int | None  # cgroup memory.current now; None: not readable
    baseline: int | None  # the same at the last health-timer reading; None: none yet

    @property
    def growth(self) -> int | None:
        if self.current is None or self.baseline is None:
            return None
        return self.current - self.baseline


@dataclass(frozen=True, slots=True)
class Culprit:
    engine: str
    memory: int
    growth: int | None
    why: str  # "grew most" or "holds most"


def culprit(engines: Mapping[str, EngineMemory]) -> Culprit | None:
    """The engine to stop: the one that grew most (growth > 0); else the one that holds the
    most; None when no engine has a reading. Ties go to the name that sorts first, so the
    choice does not depend on the mapping's order."""
    readable = sorted((name, m) for name, m in engines.items() if m.current is not None)
    if not readable:
        return None
    growing = [(m.growth, name, m) for name, m in readable
               if m.growth is not None and m.growth > 0]
    if growing:
        best = max(growing, key=lambda g: (g[0], _neg(g[1])))
        return Culprit(best[1], best[2].current or 0, best[0], "grew most")
    name, m = max(readable, key=lambda r: (r[1].current or 0, _neg(r[0])))
    return Culprit(name, m.current or 0, m.growth, "holds most")


def _neg(name: str) -> tuple[int, ...]:
    """A key under which the earlier name sorts higher (max picks it on ties)."""
    return tuple(-ord(c) for c in name)


def cgroup_of(proc_cgroup_text: str) -> str | None:
    """The unified-hierarchy path from /proc/PID/cgroup (`0::/system.slice/x.service`)."""
    for line in proc_cgroup_text.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or None
    return None


# -- the two readers (adapters: each opens files) -------------------------------------------

MEMINFO: Final = "/proc/meminfo"
CGROUP_ROOT: Final = "/sys/fs/cgroup"


def read_available(path: str = MEMINFO) -> int:
    """MemAvailable now. One open and read of a ~1.5 KB file: ~30 us (bench/watch_floor.py)."""
    with open(path, encoding="ascii", errors="replace") as f:
        return available_bytes(f.read())


def read_cgroup_memory(pid: int, *, proc: str = "/proc", root: str = CGROUP_ROOT) -> int | None:
    """memory.current of the cgroup `pid` runs in (its unit's, for a systemd service), in
    bytes; None when the process is gone, runs in no unified cgroup, or the file is absent
    (a host without the memory controller)."""
    try:
        with open(f"{proc}/{pid}/cgroup", encoding="utf-8", errors="replace") as f:
            path = cgroup_of(f.read())
        if path is None:
            return None
        with open(f"{root}{path}/memory.current", encoding="ascii") as f:
            return int(f.read().strip())
    except (OSError, ValueError):
        return None


def read_engine_memory(pid: int, *, proc: str = "/proc", root: str = CGROUP_ROOT) -> int | None:
    """What an engine holds: its cgroup's memory.current (every process of the unit, page
    cache it caused included), or where that cannot be read (no memory controller delegated)
    the main process's resident set from /proc/PID/statm; None when the process is gone."""
    current = read_cgroup_memory(pid, proc=proc, root=root)
    if current is not None:
        return current
    try:
        with open(f"{proc}/{pid}/statm", encoding="ascii") as f:
            return int(f.read().split()[1]) * PAGE
    except (OSError, ValueError, IndexError):
        return None
