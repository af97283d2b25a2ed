"""Speculative dispatch: the static map, only-one-variant, and measured dispatch's measuring,
choice of the faster variant and re-checking share."""

from __future__ import annotations

from sparkd.config import SpeculativeConfig, Variant
from sparkd.gateway.dispatch import DecodeStats, choose

STATIC = SpeculativeConfig(method="eagle3", draft_model="d")
MEASURED = SpeculativeConfig(method="eagle3", draft_model="d", dispatch="measured",
                             min_samples=3, recheck_share=0.1)
BOTH: tuple[Variant, ...] = ("plain", "speculative")
PLAIN: tuple[Variant, ...] = ("plain",)
SPECULATIVE: tuple[Variant, ...] = ("speculative",)


def test_static_map_defaults() -> None:
    stats = DecodeStats()
    got = {w: choose("m", w, BOTH, STATIC, stats, draw=0.5).variant
           for w in ("structured", "code", "vision", "chat")}
    assert got == {"structured": "plain", "code": "plain", "vision": "speculative",
                   "chat": "speculative"}


def test_configured_map_wins() -> None:
    spec = SpeculativeConfig(method="eagle", draft_model="d",
                             routes=(("structured", "speculative"), ("chat", "plain")))
    assert choose("m", "structured", BOTH, spec, DecodeStats(), draw=0).variant == "speculative"
    assert choose("m", "chat", BOTH, spec, DecodeStats(), draw=0).variant == "plain"


def test_only_the_running_variant_serves() -> None:
    c = choose("m", "chat", PLAIN, STATIC, DecodeStats(), draw=0.5)
    assert (c.variant, c.reason) == ("plain", "only plain runs")
    c = choose("m", "structured", SPECULATIVE, STATIC, DecodeStats(), draw=0.5)
    assert c.variant == "speculative"
    assert choose("m", "chat", PLAIN, None, DecodeStats(), draw=0.5).reason == "one variant"


def test_measured_samples_both_then_prefers_the_faster_and_rechecks() -> None:
    stats = DecodeStats()
    picks = []
    for _ in range(6):
        c = choose("m", "structured", BOTH, MEASURED, stats, draw=0.5)
        assert c.reason == "measuring"
        picks.append(c.variant)
        stats.record("m", "structured", c.variant, 30.0 if c.variant == "plain" else 15.0)
    assert sorted(picks) == ["plain"] * 3 + ["speculative"] * 3
    c = choose("m", "structured", BOTH, MEASURED, stats, draw=0.5)
    assert (c.variant, c.reason) == ("plain", "measured faster")
    c = choose("m", "structured", BOTH, MEASURED, stats, draw=0.05)
    assert (c.variant, c.reason) == ("speculative", "re-checking")
    # Chat has its own samples: still measuring.
    assert choose("m", "chat", BOTH, MEASURED, stats, draw=0.5).reason == "measuring"


def test_stats_window_forgets_old_traffic() -> None:
    stats = DecodeStats(window=3)
    for rate in (100.0, 100.0, 100.0, 10.0, 10.0, 10.0):
        stats.record("m", "chat", "speculative", rate)
    assert stats.count("m", "chat", "speculative") == 3
    assert stats.mean("m", "chat", "speculative") == 10.0
    stats.record("m", "chat", "plain", 0.0)  # no tokens: not a sample
    assert stats.count("m", "chat", "plain") == 0
    assert stats.snapshot()["m"]["chat/speculative"] == {"samples": 3, "tokens_per_s": 10.0}
