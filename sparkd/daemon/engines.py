"""What the daemon knows about each engine (a model's plain or speculative variant). Pure:
values in, values out."""

from __future__ import annotations

from dataclasses import dataclass, field

from sparkd.config import ModelConfig, Variant
from sparkd.engine.fingerprints import Match
from sparkd.engine.probe import ProbeResult
from sparkd.engine.unit import SPEC_SUFFIX, health_url, instance_of
from sparkd.systemd.manager import UnitStatus


@dataclass(slots=True)
class EngineView:
    """What the daemon knows about one engine, refreshed from signals and probes."""

    model: ModelConfig
    unit: UnitStatus
    variant: Variant = "plain"
    health: ProbeResult | None = None
    health_failures: int = 0
    healthy_since: float | None = None
    fingerprints: list[Match] = field(default_factory=list)
    note: str | None = None  # why a speculative variant is not running, say

    @property
    def unit_name(self) -> str:
        return self.model.unit_for(self.variant)

    @property
    def port(self) -> int:
        return self.model.port_for(self.variant)

    @property
    def health_url(self) -> str:
        return health_url(self.port)


def engine_key(model: str, variant: Variant) -> str:
    """The key of an engine in `Supervisor.engines`: the unit's instance name."""
    return model if variant == "plain" else f"{model}{SPEC_SUFFIX}"


def model_of_unit(unit: str) -> str | None:
    """The engine key of an engine unit (None for any other unit)."""
    return instance_of(unit)
