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
from sparkd.gateway import classify, dispatch, limits, prepare, rewrite, routing
from sparkd.gateway.metrics import Metrics
from sparkd.gateway.worker import PrepareWorker

log = logging.getLogger(__name__)

BAD_MESSAGES_KEPT: Final = 64
BAD_MESSAGES_FULL: Final = "(more)"

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
    link_errors: set[str] = field(default_factory=set)
    last_link_error: str | None = None

    def bad_message(self, why: str) -> None:
        """A message from sparkd that does not fit the schema: an error in the journal, once
        for each distinct reason (a stream of them must not flood it), and skipped."""
        where = why.split(": expected", 1)[0]  # the path, not the value: values change
        if where in self.bad_messages:
            return
        if len(self.bad_messages) >= BAD_MESSAGES_KEPT:
            if BAD_MESSAGES_FULL not in self.bad_messages:
                self.bad_messages.add(BAD_MESSAGES_FULL)
                log.error("more messages from sparkd do not fit its schema; further reasons "
                          "are not logged")
            return
        self.bad_messages.add(where)
        log.error("ignoring a message from sparkd that does not fit its schema (is sparkd "
                  "the same version as the gateway?): %s", why)

    def link_failed(self, why: str) -> None:
        """The event stream failed: at WARNING the first time for each kind of failure (a
        gateway refused by sparkd, say, must not fail in silence), then at debug."""
        kind = why.split(":", 1)[0] + why.split(":", 1)[-1][:40]
        self.last_link_error = why
        if kind in self.link_errors:
            log.debug("daemon event stream: %s", why)
            return
        if len(self.link_errors) < BAD_MESSAGES_KEPT:
            self.link_errors.add(kind)
        log.warning("cannot follow sparkd's events (retrying): %s", why)

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
    recipe: prepare.Recipe  # what preparing a request needs (rules, policies, limits)
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
WORKER: Final = web.AppKey("worker", PrepareWorker)


def settings_for(config: Config, *, daemon_call: DaemonCall | None = None) -> Settings:
    gc = config.gateway.classifier
    socket = config.daemon.control_socket

    async def call(method: str, params: dict[str, Any]) -> Any:
        return await aio_client.call(socket, method, params)

    rules = classify.rules_from(
        code_user_agents=gc.code_user_agents,
        code_system_prompts=gc.code_system_prompts,
        code_patterns=gc.code_patterns,
    )
    policies = {
        name: rewrite.resolve_policy(m.role_policy, name, m.source, str(m.path))
        for name, m in config.models.items()
    }
    g = config.gateway
    return Settings(
        config=config,
        rules=rules,
        policies=policies,
        daemon_call=daemon_call or call,
        recipe=prepare.Recipe(
            models=tuple(sorted(config.models)), policies=policies, rules=rules,
            limits=limits.Limits(max_messages=g.max_messages, max_parts=g.max_parts,
                                 classifier_chars=g.classifier_chars),
            allow_remote_images=g.allow_remote_images,
        ),
    )
