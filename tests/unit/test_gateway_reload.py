"""The gateway's SIGHUP: a new config in force without a restart, what needs one said."""

from __future__ import annotations

from pathlib import Path

from sparkd.config import parse_config
from sparkd.gateway.app import apply_config, build_app
from sparkd.gateway.state import CONFIG, STATE, settings_for

A = '[models.x]\nengine = "sim"\nport = 9001\n'
B = A + ('[models.y]\nengine = "sim"\nport = 9002\nrole_policy = "strict"\n'
          '[models.ext]\nengine = "external"\nurl = "http://127.0.0.1:9100"\n')


def test_reload_puts_new_models_and_policies_in_force() -> None:
    app = build_app(settings_for(parse_config(A, source=Path("/etc/sparkd.toml"))),
                    subscribe=False)
    before = app[CONFIG].current
    fixed = apply_config(app, parse_config(B, source=Path("/etc/sparkd.toml")))
    now = app[CONFIG].current
    assert fixed == []
    assert sorted(now.config.models) == ["ext", "x", "y"]
    assert now.policies["y"].policy == "strict"
    assert now.daemon_call is before.daemon_call  # the same daemon link
    # The routing table is rebuilt too: an external model serves without the daemon.
    assert "ext" not in before.config.models
    assert list(app[STATE].serving) == ["ext"]


def test_reload_says_what_needs_a_restart() -> None:
    app = build_app(settings_for(parse_config(A, source=Path("/etc/sparkd.toml"))),
                    subscribe=False)
    moved = '[gateway]\nlisten = "127.0.0.1:9999"\n' + A
    assert apply_config(app, parse_config(moved, source=Path("/x.toml"))) == ["gateway.listen"]
