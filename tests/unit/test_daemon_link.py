"""The gateway's reading of the daemon's stream (sparkd.gateway.daemon_link.apply_event)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import status_builders as sb

from sparkd.config import parse_config
from sparkd.gateway import routing
from sparkd.gateway.daemon_link import apply_event
from sparkd.gateway.state import GatewayState

CONFIG = parse_config("""
[models.a]
engine = "sim"
port = 9001
""", source=Path("/etc/sparkd.toml"))
MODEL = CONFIG.models["a"]


def decision(state: GatewayState) -> routing.Decision:
    return routing.decide(MODEL, state.view, CONFIG.gateway, now=2.0, last_swap_request=None)


def test_a_starting_daemon_does_not_wipe_what_serves() -> None:
    """A restarted sparkd answers the gateway's subscribe before it has adopted the running
    engines: its first snapshot lists none (seen in the upgrade test on Debian 13: three
    requests got 503 model_not_loaded "active: none" while the engine served all along)."""
    state = GatewayState()
    serving = sb.status(engines=[sb.engine("a", 9001)], active_model="a")
    apply_event(state, CONFIG, sb.event("snapshot", serving), now=1.0)
    assert isinstance(decision(state), routing.Serve)
    starting = sb.status(daemon=sb.daemon(state="starting"))
    apply_event(state, CONFIG, sb.event("snapshot", starting), now=2.0)
    assert isinstance(decision(state), routing.Serve)
    # Once running, what it says is the view again.
    apply_event(state, CONFIG, sb.event("snapshot", sb.status()), now=3.0)
    assert isinstance(decision(state), routing.Refuse)


def test_before_any_running_status_requests_hold() -> None:
    state = GatewayState()
    starting = sb.status(daemon=sb.daemon(state="starting"))
    apply_event(state, CONFIG, sb.event("snapshot", starting), now=1.0)
    assert decision(state) == routing.Hold("waiting for sparkd's first status")


def test_a_stopping_daemon_is_still_read() -> None:
    state = GatewayState()
    stopping = dataclasses.replace(sb.status(engines=[sb.engine("a", 9001)], active_model="a"),
                                   daemon=sb.daemon(state="stopping"))
    apply_event(state, CONFIG, sb.event("snapshot", stopping), now=1.0)
    assert isinstance(decision(state), routing.Serve)
