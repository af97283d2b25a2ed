"""door.ConnectionGuard: which connection makes room at the limit, what a sweep closes, and
that a sweep closes a bounded batch at a time (issue 10 item 5). The transports are stand-ins
for the one asyncio interface the guard uses: write, close, abort."""

from __future__ import annotations

import asyncio
from typing import cast

from sparkd.gateway.door import SWEEP_BATCH, ConnectionGuard, Phase


class Transport:
    def __init__(self) -> None:
        self.written = b""
        self.closed = self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += data

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def guard(limit: int, clock: Clock) -> ConnectionGuard:
    return ConnectionGuard(limit=limit, header_timeout_s=10, idle_timeout_s=60,
                           body_timeout_s=60, clock=clock)


def connect(g: ConnectionGuard) -> Transport:
    t = Transport()
    g.admit(cast(asyncio.Transport, t))
    return t


def test_at_the_limit_the_oldest_idle_or_slow_connection_makes_room() -> None:
    clock = Clock()
    g = guard(3, clock)
    working, slow, idle = connect(g), connect(g), connect(g)
    g.request_started(cast(asyncio.Transport, working), body=False)  # being answered
    clock.now = 1
    g.data(g._conns[cast(asyncio.Transport, slow)])
    clock.now = 2
    g.request_done(cast(asyncio.Transport, idle))  # idle again, most recently
    newcomer = connect(g)
    assert slow.aborted and not idle.aborted and not working.aborted
    assert len(g) == 3 and not newcomer.aborted


def test_when_every_connection_is_answered_the_newcomer_gets_503() -> None:
    clock = Clock()
    g = guard(2, clock)
    for t in (connect(g), connect(g)):
        g.request_started(cast(asyncio.Transport, t), body=False)
    refused = connect(g)
    assert refused.written.startswith(b"HTTP/1.1 503") and b"connection_limit" in refused.written
    assert refused.closed and len(g) == 2


def test_a_sweep_closes_what_overstays_a_batch_at_a_time() -> None:
    clock = Clock()
    g = guard(10_000, clock)
    slow = [connect(g) for _ in range(3 * SWEEP_BATCH + 5)]
    for t in slow:
        g.data(g._conns[cast(asyncio.Transport, t)])
    fresh = connect(g)
    body = connect(g)
    g.request_started(cast(asyncio.Transport, body), body=True)
    assert g._conns[cast(asyncio.Transport, body)].phase == Phase.BODY
    clock.now = 10.5  # past the header timeout, within the idle and body ones
    assert [g.sweep() for _ in range(5)] == [SWEEP_BATCH] * 3 + [5, 0]
    assert all(t.aborted for t in slow) and not fresh.aborted and not body.aborted
    clock.now = 66
    assert g.sweep() == 2 and fresh.aborted and body.aborted and len(g) == 0


def test_the_sweeper_task_closes_them_all_yielding_between_batches() -> None:
    async def main() -> tuple[int, int]:
        clock = Clock()
        g = ConnectionGuard(limit=10_000, header_timeout_s=0.5, idle_timeout_s=60,
                            body_timeout_s=60, clock=clock)
        for _ in range(5 * SWEEP_BATCH):
            g.data(g._conns[cast(asyncio.Transport, connect(g))])
        turns = 0

        async def count_turns() -> None:
            nonlocal turns
            while True:
                await asyncio.sleep(0)
                turns += 1

        counter = asyncio.create_task(count_turns())
        clock.now = 1.0
        task = asyncio.create_task(g.run())
        for _ in range(200):
            await asyncio.sleep(0.01)
            if not len(g):
                break
        task.cancel()
        counter.cancel()
        await asyncio.gather(task, counter, return_exceptions=True)
        return len(g), turns

    left, turns = asyncio.run(main())
    assert left == 0 and turns >= 5
