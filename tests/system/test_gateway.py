"""sparkd-gateway.service in a booted systemd, from the .deb: enabled and started by the
package, running as its own user in group sparkd, following the real daemon's event stream
over the control socket, and serving through to the default simulated engine."""

from __future__ import annotations

import json
from typing import Any

import pytest
from checks import wait_for
from harness import Container

pytestmark = pytest.mark.system

DEFAULT = "sim-small"
GATEWAY = "http://127.0.0.1:8000"


def curl_json(box: Container, *args: str) -> Any:
    out = box.exec(["curl", "-s", *args]).stdout
    return json.loads(out)


def health(box: Container) -> dict[str, Any]:
    out = box.exec(["curl", "-s", GATEWAY + "/health"], check=False, quiet=True).stdout
    try:
        result: dict[str, Any] = json.loads(out)
    except ValueError:  # not listening yet
        return {}
    return result


def test_gateway_unit_runs_as_its_own_user_and_follows_the_daemon(container: Container) -> None:
    container.wait_unit_active("sparkd-gateway.service", timeout=60)
    out = container.exec(["systemctl", "show", "sparkd-gateway.service",
                          "--property=User,ActiveState,SubState,UnitFileState"]).stdout
    props = dict(line.split("=", 1) for line in out.splitlines() if "=" in line)
    assert props == {"User": "sparkd-gateway", "ActiveState": "active", "SubState": "running",
                     "UnitFileState": "enabled"}
    wait_for("the gateway to see the default model healthy",
             lambda: health(container).get("loaded") == [DEFAULT])
    assert health(container)["daemon"]["connected"] is True


def test_gateway_serves_through_to_the_engine(container: Container) -> None:
    body = json.dumps({"model": DEFAULT, "max_tokens": 8, "messages": [
        {"role": "user", "content": "title?"}, {"role": "user", "content": "hello"}]})
    reply = curl_json(container, "-H", "Content-Type: application/json", "-d", body,
                      GATEWAY + "/v1/chat/completions")
    assert reply["model"] == DEFAULT and reply["choices"][0]["message"]["content"]
    models = curl_json(container, GATEWAY + "/v1/models")
    states = {m["id"]: m["sparkd"]["state"] for m in models["data"]}
    assert states[DEFAULT] == "loaded"
    missing = curl_json(container, "-H", "Content-Type: application/json", "-d",
                        json.dumps({"model": "nope", "messages": []}),
                        GATEWAY + "/v1/chat/completions")
    assert missing["error"]["code"] == "model_not_found"
    metrics = container.exec(["curl", "-s", GATEWAY + "/metrics"]).stdout
    assert "sparkd_gateway_daemon_connected 1.0" in metrics


def test_gateway_reconnects_when_sparkd_restarts(container: Container) -> None:
    container.exec(["systemctl", "restart", "sparkd.service"])
    container.wait_unit_active("sparkd.service", timeout=60)
    wait_for("the gateway to follow the restarted daemon",
             lambda: health(container).get("daemon", {}).get("connected") is True
             and health(container).get("loaded") == [DEFAULT])
    out = container.exec(["systemctl", "show", "sparkd-gateway.service",
                          "--property=NRestarts"]).stdout
    assert out.strip() == "NRestarts=0"  # it reconnected; it was not restarted


def test_gateway_prepares_a_large_body_in_its_worker_under_the_unit(container: Container
                                                                     ) -> None:
    """Bodies over 16 KiB are prepared in the gateway's worker process: it starts and works
    inside the hardened unit (its user, its system call filter), and a malformed large body
    is still an OpenAI-style 400 (issue 10)."""
    container.wait_unit_active("sparkd-gateway.service", timeout=60)
    wait_for("the gateway to see the default model healthy",
             lambda: health(container).get("loaded") == [DEFAULT])
    large = {"role": "user", "content": "word " * 5000}
    body = json.dumps({"model": DEFAULT, "max_tokens": 4, "messages": [
        large, {"role": "user", "content": "hello"}]})
    reply = curl_json(container, "-H", "Content-Type: application/json", "--data-binary",
                      body, GATEWAY + "/v1/chat/completions")
    assert reply["choices"][0]["message"]["content"], reply
    bad = json.dumps({"model": DEFAULT, "messages": [
        large, {"role": "assistant", "content": "x", "tool_calls": 5}]})
    refused = curl_json(container, "-H", "Content-Type: application/json", "--data-binary",
                        bad, GATEWAY + "/v1/chat/completions")
    assert refused["error"]["code"] == "invalid_type", refused
    pid = container.exec(["systemctl", "show", "sparkd-gateway.service",
                          "--property=MainPID", "--value"]).stdout.strip()
    workers = container.exec(["ps", "-o", "user:32=,args=", "--ppid", pid]).stdout
    assert "sparkd.gateway.worker" in workers and workers.split()[0] == "sparkd-gateway", workers
