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


def test_reload_reads_the_keys_again_and_refuses_a_bad_keys_file(tmp_path: Path) -> None:
    from sparkd.errors import ConfigError
    from sparkd.gateway import auth, door

    secret, digest = auth.new_key()
    keys = tmp_path / "keys.toml"
    keys.write_text(auth.add_entry("", "alice", digest))
    keys.chmod(0o600)
    text = f'[gateway]\nkeys_file = "{keys}"\n' + A
    app = build_app(settings_for(parse_config(A, source=Path("/x.toml"))), subscribe=False)
    assert not app[door.DOOR].keys
    apply_config(app, parse_config(text, source=Path("/x.toml")))
    entry = app[door.DOOR].keys.verify(secret)
    assert entry is not None and entry.name == "alice"
    keys.chmod(0o666)  # a bad file: refused, the keys in force stay
    try:
        apply_config(app, parse_config(text.replace("[models.x]", "[models.z]"),
                                       source=Path("/x.toml")))
    except ConfigError as exc:
        assert "chmod 0600" in exc.message
    else:
        raise AssertionError("a world-writable keys file was accepted")
    assert app[door.DOOR].keys.verify(secret) is not None
    assert sorted(app[CONFIG].current.config.models) == ["x"]
