"""auth: API keys (digests, constant-time comparison, per-key models and rates), the keys
file and its mode, Host and Origin checks (issue 10 item 3)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from sparkd.errors import ConfigError
from sparkd.gateway import auth

NONE: frozenset[str] = frozenset()


def test_a_new_key_verifies_and_only_its_digest_is_stored() -> None:
    secret, digest = auth.new_key()
    assert secret.startswith("sk-sparkd-") and len(secret) >= 50
    text = auth.add_entry("", "alice", digest, models=("qwen",), rate_per_minute=60, burst=5)
    assert secret not in text and digest in text
    keys = auth.parse_keys(text, source="k.toml")
    entry = keys.verify(secret)
    assert entry is not None and entry.name == "alice"
    assert entry.allows("qwen") and not entry.allows("llama")
    assert keys.verify(secret[:-1] + ("A" if secret[-1] != "A" else "B")) is None
    assert keys.verify("") is None and keys.verify("\udcff") is None
    other_secret, other = auth.new_key()
    both = auth.parse_keys(auth.add_entry(text, "bob", other), source="k.toml")
    assert [both.verify(s).name for s in (secret, other_secret)] == ["alice", "bob"]  # type: ignore[union-attr]


def test_adding_a_key_twice_or_with_a_bad_name_is_refused() -> None:
    _, digest = auth.new_key()
    text = auth.add_entry("# keys\n", "alice", digest)
    assert text.startswith("# keys\n")
    with pytest.raises(ConfigError, match="exists already"):
        auth.add_entry(text, "alice", digest)
    with pytest.raises(ConfigError, match="key name"):
        auth.add_entry(text, "a b]", digest)


@pytest.mark.parametrize(("text", "message"), [
    ('[keys.a]\ndigest = "sk-sparkd-plaintext"\n', "never the key itself"),
    ('[keys.a]\ndigest = "x"\nmodel = ["q"]\n', "keys.a.model: unknown key"),
    ("[keys.a]\nrate_per_minute = 5\n", "digest"),
    ("[other]\n", "unknown key"),
    ("keys = 5\n", "expected tables"),
    ("[keys\n", "not valid TOML"),
])
def test_bad_keys_files_name_the_key(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as err:
        auth.parse_keys(text, source="/etc/sparkd/gateway-keys.toml")
    assert err.value.message.startswith("/etc/sparkd/gateway-keys.toml")


def test_rates_must_be_positive_finite_numbers() -> None:
    _, digest = auth.new_key()
    for bad in ("0", "-1", "inf", "nan", "true", '"5"', "1e300"):
        with pytest.raises(ConfigError, match="rate_per_minute"):
            auth.parse_keys(f'[keys.a]\ndigest = "{digest}"\nrate_per_minute = {bad}\n',
                            source="k")


def test_the_keys_file_mode_is_checked(tmp_path: Path) -> None:
    _, digest = auth.new_key()
    path = tmp_path / "keys.toml"
    path.write_text(auth.add_entry("", "alice", digest))
    for mode, word in ((0o644, "read"), (0o660, "change"), (0o602, "change")):
        path.chmod(mode)
        with pytest.raises(ConfigError, match=f"{mode:04o} lets other users {word} it"):
            auth.read_keys_file(path)
    for mode in (0o600, 0o640, 0o400):
        path.chmod(mode)
        assert auth.read_keys_file(path)
    link = tmp_path / "link.toml"
    link.symlink_to(path)
    with pytest.raises(ConfigError, match="symlink"):
        auth.read_keys_file(link)
    with pytest.raises(ConfigError, match="gateway-key add"):
        auth.read_keys_file(tmp_path / "missing.toml")


def test_a_systemd_credential_is_preferred_when_not_empty(tmp_path: Path) -> None:
    _, file_digest = auth.new_key()
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(auth.add_entry("", "from-file", file_digest))
    keys_file.chmod(0o600)
    creds = tmp_path / "creds"
    creds.mkdir()
    env = {"CREDENTIALS_DIRECTORY": str(creds)}
    assert [e.name for e in auth.load_keys(keys_file, env).entries] == ["from-file"]
    for placeholder in ("", auth.NO_KEYS_FILE):  # the unit's SetCredential= stand-in
        (creds / auth.CREDENTIAL).write_text(placeholder)
        assert [e.name for e in auth.load_keys(keys_file, env).entries] == ["from-file"]
    _, cred_digest = auth.new_key()
    (creds / auth.CREDENTIAL).write_text(auth.add_entry("", "from-cred", cred_digest))
    os.chmod(creds / auth.CREDENTIAL, 0o444)  # systemd's own mode is not ours to judge
    assert [e.name for e in auth.load_keys(keys_file, env).entries] == ["from-cred"]
    assert not auth.load_keys(None, env)


@pytest.mark.parametrize(("authorization", "api_key", "expected"), [
    ("Bearer sk-1", None, "sk-1"), ("bearer  sk-1 ", None, "sk-1"), ("Basic abc", None, None),
    (None, "sk-2", "sk-2"), ("Bearer ", "sk-2", "sk-2"), (None, None, None),
])
def test_the_presented_key(authorization: str | None, api_key: str | None,
                           expected: str | None) -> None:
    assert auth.presented_key(authorization, api_key) == expected


@pytest.mark.parametrize(("host", "ok"), [
    ("127.0.0.1:8000", True), ("localhost:8000", True), ("LOCALHOST.", True), ("[::1]:8000", True),
    ("192.168.1.5:8000", True), ("spark.lan:8000", True), ("spark.lan", True),
    ("evil.example:8000", False), ("127.0.0.1.nip.io:8000", False), ("", False),
    ("localhost.evil.example", False), ("[::1", False), ("2130706433:8000", False),
])
def test_host_names_are_loopback_ip_literals_or_configured(host: str, ok: bool) -> None:  # noqa: FBT001
    assert auth.host_allowed(host, frozenset({"spark.lan"})) is ok


@pytest.mark.parametrize(("origin", "ok"), [
    ("http://localhost:3000", True), ("http://127.0.0.1:8080", True), ("http://[::1]", True),
    ("https://spark.lan", True), ("http://evil.example", False), ("null", False),
    ("http://192.168.1.9", False), ("file://", False), ("http://[bad", False),
])
def test_origins_are_loopback_or_configured(origin: str, ok: bool) -> None:  # noqa: FBT001
    assert auth.origin_allowed(origin, frozenset({"spark.lan"})) is ok


def test_token_buckets_allow_the_burst_then_the_rate() -> None:
    _, digest = auth.new_key()
    entry = auth.parse_keys(f'[keys.a]\ndigest = "{digest}"\nrate_per_minute = 60\nburst = 2\n',
                            source="k").entries[0]
    limits = auth.RateLimits()
    assert [limits.wait(entry, 100.0) for _ in range(2)] == [0.0, 0.0]
    assert limits.wait(entry, 100.0) == pytest.approx(1.0)
    assert limits.wait(entry, 100.5) == pytest.approx(0.5)
    assert limits.wait(entry, 101.0) == 0.0
    unlimited = auth.parse_keys(f'[keys.b]\ndigest = "{digest}"\n', source="k").entries[0]
    assert all(limits.wait(unlimited, 0.0) == 0.0 for _ in range(1000))
