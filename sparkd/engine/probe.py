"""PURE: what one readiness probe of an engine found (`sparkd.engine.health` probes)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class ProbeResult:
    """One probe: the HTTP status, or why there was none; and how long it took."""

    url: str
    status: int | None
    error: str | None
    latency_s: float

    @property
    def ok(self) -> bool:
        """Healthy: exactly HTTP 200."""
        return self.status == 200

    @property
    def latency_ms(self) -> float:
        return self.latency_s * 1000

    def describe(self) -> str:
        """'HTTP 503' or the error, for log lines and status output."""
        if self.status is not None:
            return f"HTTP {self.status}"
        return self.error or "no answer"
