"""Accounting of the Spark's unified memory from /proc/meminfo.

On a DGX Spark (GB10) CPU and GPU share one pool and NVML's memory queries answer
NOT_SUPPORTED, so `/proc/meminfo` is the only reading there is. Two numbers matter:

- `MemAvailable`: what the kernel could hand out without swapping, *including* page cache it
  would have to reclaim first. sparkd's memory gate uses it.
- `MemFree`: roughly what `cudaMemGetInfo` reports on GB10. Page cache counts as *used* to CUDA,
  which is how a 70 GB model ran out of memory at 95 GB after the previous run's weights stayed
  cached (Disaster 1). Hence: drop the cache, then wait until MemAvailable stops rising.

Swap is never counted as available (gpustack issue 5779: counting it over-reports; the GPU
cannot use swapped memory).

Pure: `parse_meminfo(text)` and `assess_settle(...)` take values; `read_meminfo(path)` is the one
function that opens a file.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final

KIB: Final = 1024
MIB: Final = 1024 * KIB
GIB: Final = 1024 * MIB

MEMINFO_PATH: Final = Path("/proc/meminfo")

# "Name:   1234 kB" or "HugePages_Total:   0". Anything else is skipped, never an error: the
# file gains fields with kernel versions and a parser that raises on them would break a gate.
_LINE_RE: Final = re.compile(r"^([A-Za-z0-9_()]+):\s+(\d+)(?:\s+(kB))?\s*$", re.ASCII)
_REQUIRED: Final = ("MemTotal", "MemFree", "MemAvailable")


@dataclass(frozen=True, slots=True)
class MemInfo:
    """One reading of /proc/meminfo, every field in bytes.

    `cached` is the kernel's `Cached` as is: it includes `Shmem` (tmpfs, shared memory), which
    dropping caches cannot free. `page_cache` is the droppable part, see there.
    """

    total: int
    free: int
    available: int
    buffers: int = 0
    cached: int = 0
    shmem: int = 0
    dirty: int = 0
    swap_total: int = 0
    swap_free: int = 0

    @property
    def page_cache(self) -> int:
        """File-backed cache that `drop_caches` could free: Buffers + Cached - Shmem.

        This is the figure prestart reports as "freed ... of page cache". Dirty and mapped pages
        are part of it but are not dropped until written back / unmapped: sync first.
        """
        return max(0, self.buffers + self.cached - self.shmem)

    @property
    def used(self) -> int:
        """What is not available: MemTotal - MemAvailable (swap not involved)."""
        return max(0, self.total - self.available)


class MemInfoError(ValueError):
    """A /proc/meminfo text that lacks a field sparkd cannot do without."""


def meminfo_fields(text: str) -> dict[str, int]:
    """Every well-formed `Name: value [kB]` line, values in bytes where a unit was given.

    Malformed lines are skipped. Where a name repeats (no kernel does that), the first wins.
    """
    fields: dict[str, int] = {}
    for line in text.splitlines():
        m = _LINE_RE.match(line)
        if m is None:
            continue
        name, value, unit = m.group(1), int(m.group(2)), m.group(3)
        fields.setdefault(name, value * KIB if unit else value)
    return fields


def parse_meminfo(text: str) -> MemInfo:
    """Parse a /proc/meminfo text. Raises MemInfoError only when MemTotal, MemFree or
    MemAvailable is missing (MemAvailable exists since Linux 3.14)."""
    return meminfo_from_fields(meminfo_fields(text))


def meminfo_from_fields(fields: Mapping[str, int]) -> MemInfo:
    missing = [name for name in _REQUIRED if name not in fields]
    if missing:
        raise MemInfoError(
            "meminfo: no " + ", ".join(missing) + " line (not a Linux 3.14+ /proc/meminfo?)"
        )
    return MemInfo(
        total=fields["MemTotal"],
        free=fields["MemFree"],
        available=fields["MemAvailable"],
        buffers=fields.get("Buffers", 0),
        cached=fields.get("Cached", 0),
        shmem=fields.get("Shmem", 0),
        dirty=fields.get("Dirty", 0),
        swap_total=fields.get("SwapTotal", 0),
        swap_free=fields.get("SwapFree", 0),
    )


def read_meminfo(path: Path = MEMINFO_PATH) -> MemInfo:
    """Read and parse `path`. OSError and MemInfoError propagate to the caller."""
    return parse_meminfo(path.read_text(encoding="ascii", errors="replace"))


def format_size(n: int) -> str:
    """Bytes for a log line: '1.2 GiB', '246 MiB', '36 KiB', '0 B'. Negative sizes keep the sign."""
    sign, n = ("-", -n) if n < 0 else ("", n)
    if n >= GIB:
        return f"{sign}{n / GIB:.1f} GiB"
    if n >= MIB:
        return f"{sign}{n / MIB:.0f} MiB"
    if n >= KIB:
        return f"{sign}{n / KIB:.0f} KiB"
    return f"{sign}{n} B"


def gib(n: int) -> str:
    """Bytes as GiB with one decimal, no unit: the figures of the memory gate's messages."""
    return f"{n / GIB:.1f}"


# --- settle detection -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sample:
    """MemAvailable (bytes) at a monotonic time (seconds)."""

    t: float
    available: int


@dataclass(frozen=True, slots=True)
class SettleRule:
    """When MemAvailable counts as "stopped rising".

    Settled: over the last `window` samples it rose by less than
    max(`min_rise_bytes`, `min_rise_fraction` of MemTotal). Memory released by an exiting engine
    (CUDA teardown, unmapping) and by reclaim comes back over hundreds of milliseconds; a window
    of 4 samples at ~150 ms is ~450 ms of quiet. A fall is "not rising" (someone else
    allocating is the gate's business, not settle's). Not settled after `timeout_s` from the
    first sample: timed out (the caller goes on and lets the gate decide).
    """

    window: int = 4
    min_rise_bytes: int = 64 * MIB
    min_rise_fraction: float = 0.005
    timeout_s: float = 30.0

    def __post_init__(self) -> None:
        if self.window < 2:
            raise ValueError(f"SettleRule.window: expected at least 2 samples, got {self.window}")

    def threshold(self, total: int) -> int:
        return max(self.min_rise_bytes, int(total * self.min_rise_fraction))


class SettleState(enum.Enum):
    """SETTLING --(quiet window)--> SETTLED; SETTLING --(timeout_s elapsed)--> TIMED_OUT.

    SETTLED wins over TIMED_OUT when a sample satisfies both. Both are final.
    """

    SETTLING = "settling"
    SETTLED = "settled"
    TIMED_OUT = "timed-out"


@dataclass(frozen=True, slots=True)
class SettleVerdict:
    state: SettleState
    waited_s: float  # from the first sample to the last
    rise: int  # bytes MemAvailable rose over the last window (or all samples, if fewer)
    total_rise: int  # bytes from the first sample to the last
    threshold: int
    available: int  # the last sample's MemAvailable


def assess_settle(samples: Sequence[Sample], *, total: int, rule: SettleRule) -> SettleVerdict:
    """Decide from the samples so far (oldest first, at least one) whether memory settled."""
    if not samples:
        raise ValueError("assess_settle: needs at least one sample")
    first, last = samples[0], samples[-1]
    recent = samples[-rule.window :]
    rise = last.available - recent[0].available
    threshold = rule.threshold(total)
    waited = last.t - first.t
    if len(recent) >= rule.window and rise < threshold:
        state = SettleState.SETTLED
    elif waited >= rule.timeout_s:
        state = SettleState.TIMED_OUT
    else:
        state = SettleState.SETTLING
    return SettleVerdict(
        state=state,
        waited_s=waited,
        rise=rise,
        total_rise=last.available - first.available,
        threshold=threshold,
        available=last.available,
    )


@dataclass(slots=True)
class SettleTracker:
    """Accumulates samples and answers `assess_settle` on each: the stateful face of the rule."""

    total: int
    rule: SettleRule = field(default_factory=SettleRule)
    samples: list[Sample] = field(default_factory=list)

    def add(self, t: float, available: int) -> SettleVerdict:
        if self.samples and t < self.samples[-1].t:
            raise ValueError(f"SettleTracker.add: time went backwards ({t} < {self.samples[-1].t})")
        self.samples.append(Sample(t, available))
        return assess_settle(self.samples, total=self.total, rule=self.rule)
