"""The [gateway] keys of the door (issue 10): keys beyond loopback, host names, bounds."""

from __future__ import annotations

from pathlib import Path

import pytest

from sparkd.config import listen_is_loopback, parse_config
from sparkd.errors import ConfigError

SRC = Path("/etc/sparkd.toml")


@pytest.mark.parametrize("listen", ["0.0.0.0:8000", "192.168.1.5:8000", "[::]:8000",
                                    "spark.lan:8000"])
def test_a_reachable_listen_needs_keys(listen: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(f'[gateway]\nlisten = "{listen}"\n', source=SRC)
    message = err.value.message
    assert message.startswith("/etc/sparkd.toml: gateway.listen:")
    assert "gateway.keys_file" in message and "sparkd gateway-key add" in message
    config = parse_config(f'[gateway]\nlisten = "{listen}"\n'
                          'keys_file = "/etc/sparkd/gateway-keys.toml"\n', source=SRC)
    assert config.gateway.keys_file == Path("/etc/sparkd/gateway-keys.toml")


@pytest.mark.parametrize("listen", ["127.0.0.1:8000", "127.1.2.3:80", "[::1]:8000",
                                    "localhost:8000"])
def test_loopback_needs_no_keys(listen: str) -> None:
    assert listen_is_loopback(listen)
    assert parse_config(f'[gateway]\nlisten = "{listen}"\n', source=SRC).gateway.keys_file is None


@pytest.mark.parametrize(("line", "message"), [
    ('keys_file = "keys.toml"', "gateway.keys_file: expected an absolute path"),
    ('allowed_hosts = ["spark lan"]', "gateway.allowed_hosts[0]: expected a host name"),
    ('allowed_hosts = ["evil.example/x"]', "gateway.allowed_hosts[0]"),
    ("header_timeout_s = 0", "gateway.header_timeout_s"),
    ("body_timeout_s = inf", "gateway.body_timeout_s: expected a number"),
    ("body_timeout_s = 7200", "gateway.body_timeout_s: expected a number of seconds"),
    ("idle_timeout_s = nan", "gateway.idle_timeout_s"),
    ("max_connections = 1", "gateway.max_connections: expected an integer from 16"),
    ("body_memory_bytes = 2048", "gateway.body_memory_bytes: expected at least"),
])
def test_bad_door_keys_name_the_key(line: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        parse_config(f"[gateway]\n{line}\n", source=SRC)


def test_host_names_are_kept_lower_case_without_the_trailing_dot() -> None:
    config = parse_config('[gateway]\nallowed_hosts = ["Spark.LAN."]\n', source=SRC)
    assert config.gateway.allowed_hosts == ("spark.lan",)


def test_an_external_urls_credentials_are_not_in_a_config_error() -> None:
    text = '[models.e]\nengine = "vllm"\nport = 9\nurl = "http://bob:pw-s3cret@h:1"\n'
    with pytest.raises(ConfigError) as err:
        parse_config(text, source=SRC)
    assert "s3cret" not in err.value.message and "***@h:1" in err.value.message
