"""The gateway's stop (SIGTERM: `systemctl stop` or `restart`, every package upgrade): stop
listening, give the requests in flight STOP_GRACE_S to finish, then cancel the rest.

Issue 12: stop and restart finish within 2 s with clients connected. aiohttp's own graceful
shutdown (3.14, web_protocol.py `RequestHandler.shutdown`) waits up to its shutdown_timeout
for each handler, then cancels the request's body and waits up to shutdown_timeout again
before it cancels the handler: a streaming reply, which the body's cancellation does not reach,
takes both waits (with the gateway's earlier 5 s, one stream in flight made every stop 10 s).
Here the handlers still running after the grace are cancelled at once: a streaming client
sees its stream end, and the request to the engine is closed with it, so the engine stops
generating for nobody. A stop then takes the grace at most, plus the loop's own end.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Final

from aiohttp import web

from sparkd.journal import event

log = logging.getLogger("sparkd.gateway")

STOP_GRACE_S: Final = 0.5
# aiohttp's own wait for the handlers, once ours are done or cancelled: a backstop only.
SHUTDOWN_TIMEOUT_S: Final = 0.2
IN_FLIGHT: Final = web.AppKey("in_flight", set[asyncio.Task[object]])


def track(app: web.Application) -> set[asyncio.Task[object]]:
    """The set the route adds its running handler's task to (and removes it from)."""
    tasks: set[asyncio.Task[object]] = set()
    app[IN_FLIGHT] = tasks
    return tasks


async def drain(runner: web.BaseRunner, app: web.Application, *,
                grace_s: float = STOP_GRACE_S) -> None:
    """Stop accepting, wait up to `grace_s` for the requests in flight, cancel the rest."""
    loop = asyncio.get_running_loop()
    for site in list(runner.sites):
        await site.stop()
    tasks = app[IN_FLIGHT]
    deadline = loop.time() + grace_s
    while tasks and loop.time() < deadline:
        await asyncio.sleep(0.01)
    left = [t for t in tasks if not t.done()]
    if not left:
        return
    for task in left:
        task.cancel()
    await asyncio.wait(left, timeout=SHUTDOWN_TIMEOUT_S)
    event(log, "gateway_stop_cancelled", "stopping: %d request(s) still in flight after "
          "%g s were cancelled", len(left), grace_s, level=logging.WARNING)
