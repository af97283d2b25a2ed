"""The control socket's event stream: every subscriber (the gateway, `sparkctl swap`) gets a
snapshot, then one message per event, each carrying the full status."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any, Final

SUBSCRIBER_QUEUE: Final = 256
SUBSCRIBER_KEEPALIVE_S: Final = 30.0


class EventStream:
    def __init__(self, status: Callable[[], dict[str, Any]]) -> None:
        self._status = status
        self.subscribers: set[asyncio.Queue[dict[str, Any]]] = set()

    def publish(self, name: str, **fields: Any) -> None:
        """Send an event, with the full status, to every subscriber. A subscriber that does
        not keep up is dropped (its stream ends) rather than holding the daemon's memory."""
        if not self.subscribers:
            return
        message = {"event": name, **fields, "status": self._status()}
        for queue in list(self.subscribers):
            try:
                queue.put_nowait(message)
            except asyncio.QueueFull:
                self.subscribers.discard(queue)

    async def subscribe(self) -> AsyncIterator[dict[str, Any]]:
        """The event stream of one subscriber: a snapshot first, then each event."""
        queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=SUBSCRIBER_QUEUE)
        self.subscribers.add(queue)
        try:
            yield {"event": "snapshot", "status": self._status()}
            while queue in self.subscribers or not queue.empty():
                try:
                    yield await asyncio.wait_for(queue.get(), SUBSCRIBER_KEEPALIVE_S)
                except TimeoutError:
                    if queue not in self.subscribers:
                        return
                    yield {"event": "keepalive"}
        finally:
            self.subscribers.discard(queue)
