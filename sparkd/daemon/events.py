"""The control socket's event stream: every subscriber (the gateway, `sparkctl swap`) gets a
snapshot, then one message per event, each carrying the full status (`sparkd.control.status`
defines them all)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any, Final

from sparkd.control.status import Event, EventName, Status, SwapRecord

SUBSCRIBER_QUEUE: Final = 256
SUBSCRIBER_KEEPALIVE_S: Final = 30.0


class EventStream:
    def __init__(self, status: Callable[[], Status]) -> None:
        self._status = status
        self.subscribers: set[asyncio.Queue[Event | None]] = set()

    def publish(self, name: EventName, *, swap: SwapRecord | None = None) -> None:
        """Send an event, with the full status, to every subscriber. A subscriber that does
        not keep up is dropped (its stream ends) rather than holding the daemon's memory."""
        if not self.subscribers:
            return
        message = Event(event=name, status=self._status(), swap=swap)
        for queue in list(self.subscribers):
            if queue.qsize() >= SUBSCRIBER_QUEUE:
                self.subscribers.discard(queue)
                queue.put_nowait(None)
            else:
                queue.put_nowait(message)

    async def subscribe(self) -> AsyncGenerator[Event, None]:
        """The event stream of one subscriber: a snapshot first, then each event."""
        # One slot more than the events kept: close() always finds room for its end mark.
        queue: asyncio.Queue[Event | None] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE + 1)
        self.subscribers.add(queue)
        try:
            yield Event(event="snapshot", status=self._status())
            while queue in self.subscribers or not queue.empty():
                try:
                    message = await asyncio.wait_for(queue.get(), SUBSCRIBER_KEEPALIVE_S)
                except TimeoutError:
                    if queue not in self.subscribers:
                        return
                    yield Event(event="keepalive")
                    continue
                if message is None:
                    return
                yield message
        finally:
            self.subscribers.discard(queue)

    def close(self) -> None:
        """End every subscriber's stream now (sparkd is stopping): each sees the events
        already queued, then its end, so its connection closes instead of waiting for a
        keepalive."""
        for queue in list(self.subscribers):
            self.subscribers.discard(queue)
            queue.put_nowait(None)


async def as_json(events: AsyncIterator[Event]) -> AsyncIterator[dict[str, Any]]:
    """The stream as the control socket sends it."""
    async for ev in events:
        yield ev.to_json()
