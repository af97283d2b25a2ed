"""The gateway's state and settings, typed app keys, shared by the adapter modules."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Final

import aiohttp
from aiohttp import web

from sparkd.config import Config
from sparkd.control import aio_client
from sparkd.gateway import classify, dispatch, rewrite, routing
from sparkd.gateway.metrics import Metrics

log = logging.getLogger(__name__)

BAD_MESSAGES_KEPT: Final = 64

DaemonCall = Callable[[str, dict[str, Any]], Awaitable[Any]]


@dataclass(slots=True)
class GatewayState:
    """What the gateway knows and remembers; mutated only on the event loop."""

    view: routing.DaemonView = field(default_factory=routing.DaemonView)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    held: int = 0
    last_swap_request: float | None = None
    last_swap_model: str | None = None
    swap_failures: dict[str, tuple[float, str]] = field(default_factory=dict)
    last_used: dict[str, float] = field(default_factory=dict)
    stats: dispatch.DecodeStats = field(default_factory=dispatch.DecodeStats)
    serving: Mapping[str, routing.Serve] = field(default_factory=dict)
    bad_messages: set[str] = field(default_factory=set)

    def bad_message(self, why: str) -> None:
        """A message from sparkd that does not fit the schema: an error in the journal, once
        for each distinct reason (a stream of them must not flood it), and skipped."""
        if why in self.bad_messages:
            return
        if len(self.bad_messages) < BAD_MESSAGES_KEPT:
            self.bad_messages.add(why)
        log.error("ignoring a message from sparkd that does not fit its schema (is sparkd "
                  "the same version as the gateway?): %s", why)

    def update(self, view: routing.DaemonView, serving: Mapping[str, routing.Serve], *,
               now: float) -> None:
        self.view = view
        self.serving = serving
        for name, endpoints in view.endpoints.items():
            if any(e.healthy for e in endpoints):
                self.last_used.setdefault(name, now)  # idle time counts from first seen
            else:
                self.last_used.pop(name, None)
        # Wake every held request: each re-decides on the new view.
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass(frozen=True, slots=True)
class Settings:
    config: Config
    rules: classify.CompiledRules
    policies: Mapping[str, rewrite.PolicyChoice]
    daemon_call: DaemonCall
    clock: Callable[[], float] = time.monotonic
    draw: Callable[[], float] = random.random


@dataclass(slots=True)
class SettingsHolder:
    """The settings in force. A reload (SIGHUP) replaces `current`; each request and each
    loop iteration reads it afresh, so nothing keeps a stale config."""

    current: Settings


CONFIG: Final = web.AppKey("settings", SettingsHolder)
STATE: Final = web.AppKey("state", GatewayState)
METRICS: Final = web.AppKey("metrics", Metrics)
SESSION: Final = web.AppKey("session", aiohttp.ClientSession)


def settings_for(config: Config, *, daemon_call: DaemonCall | None = None) -> Settings:
    gc = config.gateway.classifier
    socket = config.daemon.control_socket

    async def call(method: str, params: dict[str, Any]) -> Any:
        return await aio_client.call(socket, method, params)

    return Settings(
        config=config,
        rules=classify.rules_from(
            code_user_agents=gc.code_user_agents,
            code_system_prompts=gc.code_system_prompts,
            code_patterns=gc.code_patterns,
        ),
        policies={
            name: rewrite.resolve_policy(m.role_policy, name, m.source, str(m.path))
            for name, m in config.models.items()
        },
        daemon_call=daemon_call or call,
    )
