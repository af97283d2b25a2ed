"""The gateway's worker queue is bounded: past MAX_QUEUED large bodies waiting, the next gets
503 worker_busy at once instead of waiting (and holding its body) behind them."""

from __future__ import annotations

import asyncio
import sys

import pytest

from sparkd.gateway.classify import DEFAULT_RULES
from sparkd.gateway.errors import GatewayError
from sparkd.gateway.limits import Limits
from sparkd.gateway.prepare import Recipe
from sparkd.gateway.worker import MAX_QUEUED, PrepareWorker

# A worker that reads its input and never answers (stuck on a hostile body, say).
STUCK = (sys.executable, "-c", "import sys, time; sys.stdin.buffer.read(); time.sleep(60)")


def test_past_the_bound_a_large_body_is_refused_at_once() -> None:
    recipe = Recipe(models=(), policies={}, rules=DEFAULT_RULES, limits=Limits(),
                    allow_remote_images=False)

    async def scenario() -> GatewayError:
        worker = PrepareWorker(STUCK)
        waiting = [asyncio.create_task(worker.model_name(b"{}" * 10000, recipe))
                   for _ in range(MAX_QUEUED)]
        await asyncio.sleep(0.2)
        assert worker.queued == MAX_QUEUED
        try:
            with pytest.raises(GatewayError) as refused:
                await asyncio.wait_for(worker.model_name(b"{}", recipe), 1)
        finally:
            await worker.close()
            await asyncio.gather(*waiting, return_exceptions=True)
        assert worker.queued == 0
        return refused.value

    err = asyncio.run(scenario())
    assert err.status == 503 and err.code == "worker_busy"
