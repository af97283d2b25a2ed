"""sparkd.engine.health.wait_healthy's loop, with a fake probe, clock and sleep."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import pytest

from sparkd.engine.health import MIN_PROBE_TIMEOUT_S, WaitResult, wait_healthy
from sparkd.engine.probe import ProbeResult

URL = "http://127.0.0.1:8101/health"


@dataclass
class FakeEngine:
    """Answers `statuses` in order (None: connection refused), each probe costing `cost_s`."""

    statuses: list[int | None]
    cost_s: float = 0.01
    now: float = 0.0
    timeouts: list[float] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)

    async def probe(self, url: str, timeout_s: float) -> ProbeResult:
        self.timeouts.append(timeout_s)
        self.now += self.cost_s
        status = self.statuses.pop(0) if len(self.statuses) > 1 else self.statuses[0]
        error = "cannot connect: connection refused" if status is None else None
        return ProbeResult(url=url, status=status, error=error, latency_s=self.cost_s)

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def wait(self, timeout_s: float, interval_s: float = 0.5) -> WaitResult:
        return asyncio.run(
            wait_healthy(
                URL,
                timeout_s=timeout_s,
                interval_s=interval_s,
                probe_once=self.probe,
                clock=self.clock,
                sleep=self.sleep,
            )
        )


def test_healthy_after_loading() -> None:
    engine = FakeEngine([None, None, 503, 503, 200])
    result = engine.wait(timeout_s=60)
    assert result.healthy
    assert result.probes == 5
    assert result.last.status == 200
    assert engine.sleeps == [0.5] * 4
    assert result.waited_s == pytest.approx(4 * 0.5 + 5 * 0.01)


def test_times_out_with_the_last_answer() -> None:
    engine = FakeEngine([None, 503])
    result = engine.wait(timeout_s=2, interval_s=0.3)
    assert not result.healthy
    assert result.last.describe() == "HTTP 503"
    # A probe lands on the deadline: no sleep past it, no probe after it.
    assert sum(engine.sleeps) + result.probes * engine.cost_s == pytest.approx(2.0, abs=0.02)
    assert result.waited_s >= 2.0


def test_every_probe_is_bounded_by_what_is_left() -> None:
    engine = FakeEngine([503], cost_s=0.0)
    engine.wait(timeout_s=7, interval_s=1.0)
    assert engine.timeouts[0] == 5.0  # PROBE_TIMEOUT_S while plenty is left
    assert engine.timeouts[-1] == MIN_PROBE_TIMEOUT_S  # the probe on the deadline
    assert all(MIN_PROBE_TIMEOUT_S <= t <= 5.0 for t in engine.timeouts)


def test_zero_timeout_probes_once() -> None:
    engine = FakeEngine([200])
    result = engine.wait(timeout_s=0)
    assert (result.healthy, result.probes, engine.sleeps) == (True, 1, [])
    engine = FakeEngine([None])
    result = engine.wait(timeout_s=0)
    assert (result.healthy, result.probes) == (False, 1)
    assert result.last.describe() == "cannot connect: connection refused"


def test_only_200_is_healthy() -> None:
    for status in (201, 204, 301, 503):
        assert not ProbeResult(URL, status, None, 0.0).ok
    assert ProbeResult(URL, 200, None, 0.0).ok
    assert ProbeResult(URL, None, None, 0.0).describe() == "no answer"
