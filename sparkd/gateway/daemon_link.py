"""The gateway's link to the daemon: following its event stream (reconnecting with backoff
while it is away) and asking it to unload idle models. Background tasks tied to the app's
lifetime (cleanup_ctx)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Final

from aiohttp import web

from sparkd.config import Config
from sparkd.control import aio_client
from sparkd.control.status import Event, SwapRecord
from sparkd.errors import SchemaError, SparkdError
from sparkd.gateway import routing
from sparkd.gateway.state import CONFIG, METRICS, STATE, GatewayState
from sparkd.journal import event

log = logging.getLogger(__name__)

RECONNECT_MIN_S: Final = 0.1
RECONNECT_MAX_S: Final = 5.0
IDLE_CHECK_S: Final = 30.0


async def daemon_events(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(follow_daemon(app), name="gateway-daemon-events")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def follow_daemon(app: web.Application) -> None:
    """Keep the view current from the daemon's subscribe stream; reconnect with backoff
    while the daemon is away (the last view stays: engines outlive a sparkd restart)."""
    state, m = app[STATE], app[METRICS]
    path = app[CONFIG].current.config.daemon.control_socket
    delay = RECONNECT_MIN_S
    while True:
        try:
            async for raw in aio_client.subscribe(path):
                try:
                    message = Event.from_json(raw)
                except SchemaError as exc:
                    state.bad_message(exc.message)
                    continue
                settings = app[CONFIG].current
                if message.status is not None and not state.view.connected:
                    event(log, "gateway_daemon_connected", "following sparkd's events on %s",
                          path)
                apply_event(state, settings.config, message, now=settings.clock())
                if message.status is not None:
                    m.daemon_connected.set(1)
                    delay = RECONNECT_MIN_S
        except (SparkdError, OSError, ValueError) as exc:
            state.link_failed(f"{type(exc).__name__}: {getattr(exc, 'message', exc)}")
        except Exception:  # a bug must not end the link for good: say so, and reconnect
            log.exception("the gateway's link to sparkd failed; reconnecting")
        if state.view.connected:
            event(log, "gateway_daemon_lost", "lost sparkd's event stream on %s; reconnecting",
                  path, level=logging.WARNING)
            m.daemon_connected.set(0)
            view = state.view
            state.update(routing.DaemonView(seen=view.seen, connected=False,
                                            endpoints=view.endpoints, swap=view.swap,
                                            active_model=view.active_model),
                         state.serving, now=app[CONFIG].current.clock())
        await asyncio.sleep(delay)
        delay = min(RECONNECT_MAX_S, delay * 2)


def apply_event(state: GatewayState, config: Config, message: Event, *, now: float) -> None:
    """Take one message of the daemon's stream into the gateway's state: a failed swap is
    remembered for its target (requests held for it get 503 swap_failed with the reason), and
    each status becomes the routing view. Keepalives change nothing."""
    if message.event == "swap_failed" and message.swap is not None:
        state.swap_failures[message.swap.to] = (now, swap_failure_text(message.swap))
    if message.status is None:
        return
    view = routing.view_from_status(message.status)
    state.update(view, routing.serving_table(config, view), now=now)


def swap_failure_text(swap: SwapRecord) -> str:
    """Why a swap failed, and what serves instead, as the daemon recorded it."""
    if swap.step == "refused":
        outcome = "nothing was changed"
    elif swap.step != "rolled_back":
        outcome = "the rollback failed too"
    elif swap.rollback_to:
        outcome = f"rolled back to {swap.rollback_to}"
    else:
        outcome = "stopped it, nothing to roll back to"
    return f"{swap.failure or 'it failed'}; {outcome}"


async def idle_unloader(app: web.Application) -> AsyncIterator[None]:
    task = asyncio.create_task(unload_idle(app), name="gateway-idle-unload")
    yield
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


async def unload_idle(app: web.Application, *, interval_s: float = IDLE_CHECK_S) -> None:
    state = app[STATE]
    shortest = min(m.idle_unload_minutes or 1e9
                   for m in app[CONFIG].current.config.models.values())
    interval_s = min(interval_s, shortest * 60 / 4)
    while True:
        await asyncio.sleep(interval_s)
        settings = app[CONFIG].current
        now = settings.clock()
        for name in routing.idle_models(settings.config, state.view, state.last_used, now=now):
            state.last_used[name] = now  # one request per idle period
            app[METRICS].unload_requests.labels(name).inc()
            try:
                await settings.daemon_call("unload", {"model": name})
                event(log, "gateway_idle_unload", "asked sparkd to unload %s (idle %g min)",
                      name, settings.config.models[name].idle_unload_minutes,
                      SPARKD_MODEL=name)
            except (SparkdError, OSError) as exc:
                log.warning("could not ask sparkd to unload idle %s: %s", name,
                            getattr(exc, "message", exc))
