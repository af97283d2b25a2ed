"""PURE: what the watch did, kept for `sparkctl status` and the metrics (docs/watch.md
"Shown and exported"): the last few actions (an engine stopped at the memory floor, a liveness
restart, a desktop ladder step) and how many of each kind since sparkd started, and the swaps
by how they ended. The journal has the whole story; this is the short one a person glances at.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Final

from sparkd.control.status import WatchActionRecord

KEEP: Final = 8  # actions kept for status; the counts cover everything since start


@dataclass(slots=True)
class WatchActions:
    recent: deque[WatchActionRecord] = field(default_factory=lambda: deque(maxlen=KEEP))
    counts: Counter[str] = field(default_factory=Counter)
    swaps: Counter[str] = field(default_factory=Counter)

    def record(self, kind: str, model: str, at: float, detail: str) -> None:
        """`kind`: memory_floor_stop, liveness_restart, hung_restart, ... (WatchActionRecord
        says which journal event each goes with); `at`: Unix time."""
        self.recent.append(WatchActionRecord(kind=kind, model=model, at=at, detail=detail))
        self.counts[kind] += 1

    def swap_ended(self, step: str) -> None:
        """A swap ended at `step` (done, refused, rolled_back, rollback_failed)."""
        self.swaps[step] += 1
