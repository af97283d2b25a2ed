"""PURE: speculative dispatch. Which engine variant (plain, speculative) serves a request.

Speculative decoding is an engine setting, not a per-request one (FACTS.md), so a model with a
`speculative` table can run as two engines, and the gateway picks one per request by workload
class:

- `static` (default): the configured map; by default structured and code go to plain (EAGLE's
  drafts miss on grammar-constrained and code tokens), vision and chat to speculative.
- `measured`: decode tokens/s per (class, variant) from real traffic. Until both variants have
  `min_samples` for a class, each request goes to the variant with fewer samples; then to the
  faster one, with `recheck_share` of the traffic still sent to the other so a change (a new
  draft model, a different prompt mix) is noticed.

Only variants that are up count: when only plain runs (memory allows one), everything goes
there. The randomness is passed in (`draw`), so every decision is reproducible.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Final, Literal

from sparkd.config import SpeculativeConfig, Variant

WINDOW: Final = 200  # samples kept per (class, variant): old traffic ages out

Reason = Literal[
    "one variant", "only plain runs", "only speculative runs", "map", "measuring",
    "measured faster", "re-checking",
]


@dataclass(frozen=True, slots=True)
class Choice:
    variant: Variant
    reason: Reason


@dataclass(slots=True)
class DecodeStats:
    """Decode speeds seen per (model, class, variant); mutable, no I/O."""

    window: int = WINDOW
    _samples: dict[tuple[str, str, str], deque[float]] = field(default_factory=dict)

    def record(self, model: str, workload: str, variant: Variant, tokens_per_s: float) -> None:
        if tokens_per_s <= 0:
            return
        key = (model, workload, variant)
        samples = self._samples.get(key)
        if samples is None:
            samples = self._samples[key] = deque(maxlen=self.window)
        samples.append(tokens_per_s)

    def count(self, model: str, workload: str, variant: Variant) -> int:
        return len(self._samples.get((model, workload, variant), ()))

    def mean(self, model: str, workload: str, variant: Variant) -> float:
        samples = self._samples.get((model, workload, variant))
        return sum(samples) / len(samples) if samples else 0.0

    def snapshot(self) -> dict[str, dict[str, dict[str, float]]]:
        """{model: {"class/variant": {"samples": n, "tokens_per_s": mean}}} for /health."""
        out: dict[str, dict[str, dict[str, float]]] = {}
        for (model, workload, variant), samples in sorted(self._samples.items()):
            out.setdefault(model, {})[f"{workload}/{variant}"] = {
                "samples": len(samples),
                "tokens_per_s": round(sum(samples) / len(samples), 2),
            }
        return out


def choose(
    model: str,
    workload: str,
    up: Collection[Variant],
    spec: SpeculativeConfig | None,
    stats: DecodeStats,
    *,
    draw: float,
) -> Choice:
    """The variant for one request. `up`: the variants serving now (not empty)."""
    if spec is None or len(up) <= 1:
        if "speculative" in up and "plain" not in up:
            return Choice("speculative", "only speculative runs" if spec else "one variant")
        return Choice("plain", "only plain runs" if spec else "one variant")
    mapped: Variant = spec.routes_dict.get(workload, "plain")
    if spec.dispatch == "static":
        return Choice(mapped, "map")
    counts = {v: stats.count(model, workload, v) for v in ("plain", "speculative")}
    if min(counts.values()) < spec.min_samples:
        fewer: Variant = "plain" if counts["plain"] <= counts["speculative"] else "speculative"
        return Choice(fewer, "measuring")
    plain, spec_rate = (stats.mean(model, workload, v) for v in ("plain", "speculative"))
    faster: Variant = "speculative" if spec_rate > plain else "plain"
    if draw < spec.recheck_share:
        return Choice("plain" if faster == "speculative" else "speculative", "re-checking")
    return Choice(faster, "measured faster")
