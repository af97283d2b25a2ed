"""What the daemon knows about each engine (a model's plain or speculative variant). Pure:
values in, values out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from sparkd.config import Config, ModelConfig, Variant
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
    # The engine release found installed (sparkd.engine.versions.detect_version); the
    # config's models.NAME.engine_version wins.
    engine_version: str | None = None

    @property
    def unit_name(self) -> str:
        return self.model.unit_for(self.variant)

    @property
    def release(self) -> str | None:
        """The engine release the unit is rendered for: the config's pin, else the detected."""
        return self.model.engine_version or self.engine_version

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


def stale_on_reload(engines: Mapping[str, EngineView], new: Config) -> list[tuple[str, str]]:
    """The running engines that `new` no longer describes, and why: their model (or its
    speculative variant) is gone, or their port moved (sparkd would probe the new port while
    the engine listens on the old one). A reload stops them first."""
    stale = []
    for key, view in sorted(engines.items()):
        if view.unit.running and (why := why_stale(view.model, view.variant, new)):
            stale.append((key, why))
    return stale


def why_stale(model: ModelConfig, variant: Variant, new: Config) -> str | None:
    """Why an engine started as `model`'s `variant` does not fit `new` (None when it does)."""
    now = new.models.get(model.name)
    if now is None or not now.supervised:
        return f"model {model.name} is no longer configured"
    if variant not in now.variants:
        return f"model {model.name} has no {variant} variant any more"
    if now.port_for(variant) != model.port_for(variant):
        return f"its port moved from {model.port_for(variant)} to {now.port_for(variant)}"
    return None
