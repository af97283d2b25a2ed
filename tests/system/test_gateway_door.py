"""The gateway's door in a booted systemd, from the .deb (issue 10): the unit starts without
a keys file (the SetCredential= placeholder), with its descriptor limit; API keys made by
`sparkd gateway-key add` reach it as a systemd credential when only root may read the file
(a restart), and straight from the file when its group may (a reload)."""

from __future__ import annotations

import json

import pytest
from checks import wait_for
from harness import Container

pytestmark = pytest.mark.system

DEFAULT = "sim-small"
GATEWAY = "http://127.0.0.1:8000"
KEYS = "/etc/sparkd/gateway-keys.toml"
CHAT = json.dumps({"model": DEFAULT, "max_tokens": 4,
                   "messages": [{"role": "user", "content": "hi"}]})


def status(box: Container, key: str | None = None) -> str:
    auth = ["-H", f"Authorization: Bearer {key}"] if key else []
    return box.exec(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                     "Content-Type: application/json", *auth, "-d", CHAT,
                     GATEWAY + "/v1/chat/completions"], check=False, quiet=True).stdout


def add_key(box: Container, name: str) -> str:
    out = box.exec(["sparkd", "gateway-key", "add", name, "--file", KEYS]).stdout
    secret = out.strip().splitlines()[-1]
    assert secret.startswith("sk-sparkd-")
    return secret


def test_the_unit_starts_without_keys_with_its_limits(container: Container) -> None:
    container.wait_unit_active("sparkd-gateway.service", timeout=60)
    out = container.exec(["systemctl", "show", "sparkd-gateway.service",
                          "--property=LimitNOFILE,ActiveState"]).stdout
    assert "LimitNOFILE=16384" in out and "ActiveState=active" in out
    wait_for("the gateway to serve without keys", lambda: status(container) == "200")


def test_keys_as_a_credential_then_from_the_file(container: Container) -> None:
    first = add_key(container, "first")
    mode = container.exec(["stat", "-c", "%a %U:%G", KEYS]).stdout.strip()
    assert mode == "640 root:sparkd-gateway"
    assert first not in container.exec(["cat", KEYS]).stdout
    # Only root may read it: it reaches the gateway as the unit's credential (at start).
    container.exec(["chmod", "0600", KEYS])
    container.sh(f"sed -i 's|^listen = .*|&\\nkeys_file = \"{KEYS}\"|' /etc/sparkd.toml")
    container.exec(["sparkd", "check-config"])
    container.exec(["systemctl", "restart", "sparkd-gateway.service"])
    container.wait_unit_active("sparkd-gateway.service", timeout=60)
    wait_for("the gateway to ask for a key", lambda: status(container) == "401")
    assert status(container, first) == "200"
    assert status(container, first + "x") == "401"
    # Its group may read it: a reload puts a new key in force, no restart.
    container.exec(["chmod", "0640", KEYS])
    container.exec(["chgrp", "sparkd-gateway", KEYS])
    second = add_key(container, "second")
    container.exec(["systemctl", "reload", "sparkd-gateway.service"])
    wait_for("the reloaded gateway to know the second key",
             lambda: status(container, second) == "200")
    assert status(container, first) == "200"
    out = container.exec(["systemctl", "show", "sparkd-gateway.service",
                          "--property=NRestarts"]).stdout
    assert out.strip() == "NRestarts=0"
    journal = container.exec(["journalctl", "-u", "sparkd-gateway.service", "--no-pager"]).stdout
    assert first not in journal and second not in journal
