"""The gateway's door against real HTTP on loopback (issue 10 items 2 and 3): the route
allow-list on normalized targets, the media check on every route, no redirects followed,
credentials of external URLs kept out of errors, Host and Origin checks, JSON bodies only,
API keys with per-key models and rates, and no swap for a refused request.

The engine is a recording aiohttp app on loopback (an external model): it answers every path,
as an engine with dev routes would, so a request that got through is seen."""

from __future__ import annotations

import contextlib
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import status_builders as sb
from aiohttp import web
from conftest import free_port
from gateway_harness import Gateway, engine_entry, http_request, running_gateway

from sparkd.control.status import Status
from sparkd.gateway import auth

URL_IMAGE = "http://169.254.169.254/latest/meta-data"
CHAT = {"model": "ext", "messages": [{"role": "user", "content": "hi"}]}


class Engine:
    """What reached the engine: (method, path, headers, body)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, dict[str, str], bytes]] = []
        self.lock = threading.Lock()

    async def handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        with self.lock:
            self.seen.append((request.method, request.raw_path, dict(request.headers), body))
        if request.raw_path.startswith("/redirect"):
            raise web.HTTPTemporaryRedirect("/v1/elsewhere")
        return web.json_response({"object": "chat.completion", "model": "ext", "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "ok"},
             "finish_reason": "stop"}]})

    def paths(self) -> list[str]:
        with self.lock:
            return [s[1] for s in self.seen]


@contextlib.contextmanager
def door(gateway_keys: str = "", *, url_userinfo: str = "", path_prefix: str = "",
         models: str = "", initial: Status | None = None
         ) -> Iterator[tuple[Gateway, Engine]]:
    engine = Engine()
    port = free_port()
    text = f"""
[gateway]
listen = "{{listen}}"
{gateway_keys}
[models.ext]
engine = "external"
url = "http://{url_userinfo}127.0.0.1:{port}{path_prefix}"
{models}
"""
    with running_gateway(text, initial=initial or sb.status()) as gw:
        upstream = web.Application()
        upstream.router.add_route("*", "/{tail:.*}", engine.handle)
        runner = web.AppRunner(upstream, access_log=None)

        async def start() -> None:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()

        gw.run(start)
        try:
            yield gw, engine
        finally:
            gw.run(runner.cleanup)


def raw(gw: Gateway, method: str, target: str, body: Any = None, **headers: str) -> Any:
    """A request with the target sent as written (no client-side normalization)."""
    hdrs = {"Content-Type": "application/json", **headers} if body is not None else headers
    return http_request(method, gw.url + target,
                        content=None if body is None else json.dumps(body).encode(),
                        headers=hdrs)


def image(url: str, kind: str = "image_url", *, typed: bool = True) -> dict[str, Any]:
    part: dict[str, Any] = {kind: {"url": url}}
    if typed:
        part["type"] = kind
    return {"model": "ext", "messages": [{"role": "user", "content": [part]}]}


def test_a_trailing_slash_is_the_chat_route_with_its_checks() -> None:
    with door() as (gw, engine):
        for target in ("/v1/chat/completions/", "//v1/chat/completions", "/v1/chat/./completions"):
            r = raw(gw, "POST", target, image(URL_IMAGE))
            assert r.status_code == 400, (target, r.text)
            assert r.json()["error"]["code"] == "remote_media_refused"
        r = raw(gw, "POST", "/v1/chat/completions/", CHAT)
        assert r.status_code == 200 and r.headers["X-Sparkd-Workload"] == "chat"
        assert engine.paths() == ["/v1/chat/completions"]  # the canonical path


@pytest.mark.parametrize("body", [
    image(URL_IMAGE, typed=False),
    image(URL_IMAGE, "video_url"),
    image(URL_IMAGE, "video_url", typed=False),
    image("https://example.com/a.wav", "audio_url"),
    image("file:///etc/shadow", "audio_url", typed=False),
], ids=["untyped-image", "video", "untyped-video", "audio", "untyped-local-audio"])
def test_every_media_part_kind_is_refused(body: dict[str, Any]) -> None:
    with door() as (gw, engine):
        r = raw(gw, "POST", "/v1/chat/completions", body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "remote_media_refused"
        assert URL_IMAGE not in r.text
        assert engine.paths() == []


@pytest.mark.parametrize("route", ["/v1/responses", "/v1/embeddings", "/v1/score",
                                   "/v1/messages"])
def test_media_on_the_other_routes_is_refused(route: str) -> None:
    body = {"model": "ext", "input": [{"role": "user", "content": [
        {"type": "input_image", "image_url": URL_IMAGE}]}],
        "messages": [{"role": "user", "content": [{"image_url": {"url": URL_IMAGE}}]}]}
    with door() as (gw, engine):
        r = raw(gw, "POST", route, body)
        assert r.status_code == 400 and r.json()["error"]["code"] == "remote_media_refused"
        r = raw(gw, "POST", route, {"model": "ext", "input": "inline only"})
        assert r.status_code == 200
        assert engine.paths() == [route]


@pytest.mark.parametrize("target", ["/v1/../admin", "/v1/%2e%2e/admin", "/v1/..%2f..%2fadmin",
                                    "/update_weights_from_disk", "/v1/load_lora_adapter",
                                    "/v1/%2E%2E/v1/../admin", "/v1/chat/completions%2f..%2f.."])
def test_no_target_reaches_an_engine_route_outside_the_allow_list(target: str) -> None:
    with door() as (gw, engine):
        for method in ("GET", "POST"):
            r = raw(gw, method, target, {"model": "ext"} if method == "POST" else None)
            assert r.status_code == 404, (method, target, r.text)
            assert r.json()["error"]["code"] == "not_found"
        assert engine.paths() == []


def test_dot_segments_to_the_gateways_own_routes_stay_in_the_gateway() -> None:
    with door() as (gw, engine):
        r = raw(gw, "GET", "/v1/../metrics")
        assert r.status_code == 200 and "sparkd_gateway_requests" in r.text
        r = raw(gw, "GET", "/v1/%2e%2e/health")
        assert r.status_code == 200 and r.json()["status"] == "ok"
        assert engine.paths() == []


def test_an_engines_redirect_is_a_502_and_is_not_followed() -> None:
    with door(path_prefix="/redirect") as (gw, engine):
        r = raw(gw, "POST", "/v1/chat/completions", CHAT)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_redirect"
        assert engine.paths() == ["/redirect/v1/chat/completions"]  # not /v1/elsewhere


def test_an_external_urls_credentials_never_reach_a_client() -> None:
    port = free_port()  # nothing listens there
    text = f"""
[gateway]
listen = "{{listen}}"
[models.ext]
engine = "external"
url = "http://alice:s3cr3t-pw@127.0.0.1:{port}"
"""
    with running_gateway(text, initial=sb.status()) as gw:
        r = raw(gw, "POST", "/v1/chat/completions", CHAT)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
        assert "s3cr3t" not in r.text and "alice" not in r.text
        assert f"127.0.0.1:{port}" in r.text


def test_foreign_host_origin_and_non_json_bodies_are_refused() -> None:
    extra = 'allowed_hosts = ["spark.lan"]'
    with door(extra) as (gw, engine):
        r = raw(gw, "POST", "/v1/chat/completions", CHAT, Host="rebind.evil.example:8000")
        assert r.status_code == 421 and r.json()["error"]["code"] == "host_not_allowed"
        r = raw(gw, "POST", "/v1/chat/completions", CHAT, Origin="http://evil.example")
        assert r.status_code == 403 and r.json()["error"]["code"] == "origin_not_allowed"
        r = raw(gw, "POST", "/v1/chat/completions", CHAT, Origin="null")
        assert r.status_code == 403
        for kind in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data"):
            r = raw(gw, "POST", "/v1/chat/completions", CHAT, **{"Content-Type": kind})
            assert r.status_code == 415, kind
            assert r.json()["error"]["code"] == "unsupported_media_type"
        r = http_request("POST", gw.url + "/v1/chat/completions",
                         content=json.dumps(CHAT).encode())  # no Content-Type at all
        assert r.status_code == 415
        assert engine.paths() == []
        # Names of this machine and configured ones are served.
        for host in ("spark.lan:8000", "localhost", "127.0.0.1:9", "[::1]:8000"):
            r = raw(gw, "POST", "/v1/chat/completions", CHAT, Host=host,
                    Origin="http://localhost:3000", **{"Content-Type": "application/json"})
            assert r.status_code == 200, (host, r.text)


def test_a_refused_request_never_swaps() -> None:
    status = sb.status(active_model="other", engines=[engine_entry("other", 1)])
    text = """
[gateway]
listen = "{listen}"
swap_on_demand = true
hold_seconds = 0.5
[models.want]
engine = "sim"
port = 9
[models.other]
engine = "sim"
port = 8
"""
    body = {"model": "want", "messages": [{"role": "user", "content": "hi"}]}
    with running_gateway(text, initial=status) as gw:
        for headers in ({"Host": "evil.example"}, {"Origin": "http://evil.example"},
                        {"Content-Type": "text/plain"}):
            r = raw(gw, "POST", "/v1/chat/completions", body, **headers)
            assert r.status_code in (403, 415, 421), r.text
        r = raw(gw, "POST", "/v1/chat/completions", image(URL_IMAGE) | {"model": "want"})
        assert r.status_code == 400
        assert not [c for c in gw.daemon.calls if c[0] == "swap"]
        r = raw(gw, "POST", "/v1/chat/completions", body)  # the control: this one swaps
        assert [c for c in gw.daemon.calls if c[0] == "swap"] == [("swap", {"model": "want"})]


def keys_file(tmp_path: Path, *entries: tuple[str, str]) -> tuple[Path, list[str]]:
    text, secrets = "", []
    for name, extra in entries:
        secret, digest = auth.new_key()
        text = auth.add_entry(text, name, digest)
        text += extra
        secrets.append(secret)
    path = tmp_path / "gateway-keys.toml"
    path.write_text(text)
    path.chmod(0o600)
    return path, secrets


def test_api_keys_models_and_rates(tmp_path: Path) -> None:
    path, (full, narrow) = keys_file(
        tmp_path, ("full", ""), ("narrow", 'models = ["other"]\nrate_per_minute = 2\nburst = 2\n'))
    other = """
[models.other]
engine = "external"
url = "http://127.0.0.1:9"
"""
    with door(f'keys_file = "{path}"', models=other) as (gw, engine):
        r = raw(gw, "POST", "/v1/chat/completions", CHAT)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
        r = raw(gw, "POST", "/v1/chat/completions", CHAT, Authorization="Bearer " + full + "x")
        assert r.status_code == 401 and full not in r.text
        r = raw(gw, "POST", "/v1/chat/completions", CHAT, Authorization="Bearer " + full)
        assert r.status_code == 200
        r = raw(gw, "POST", "/v1/chat/completions", CHAT, **{"X-Api-Key": full})
        assert r.status_code == 200
        # The gateway's key is not the engine's: it is not passed on.
        assert all("Authorization" not in s[2] for s in engine.seen)
        # A key limited to some models: others refused (403), and the listing shows its own.
        r = raw(gw, "POST", "/v1/chat/completions", CHAT, Authorization="Bearer " + narrow)
        assert r.status_code == 403 and r.json()["error"]["code"] == "model_not_allowed"
        r = raw(gw, "GET", "/v1/models", Authorization="Bearer " + narrow)
        assert [m["id"] for m in r.json()["data"]] == ["other"]
        # Its rate: the burst (two, the 403 and the listing), then 429 with Retry-After.
        r = raw(gw, "GET", "/v1/models", Authorization="Bearer " + narrow)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limited"
        assert 1 <= int(r.headers["Retry-After"]) <= 30
        # /health and /metrics from this machine need no key; /v1/models does.
        assert raw(gw, "GET", "/health").status_code == 200
        assert raw(gw, "GET", "/metrics").status_code == 200
        assert raw(gw, "GET", "/v1/models").status_code == 401
        assert len(engine.seen) == 2


def test_check_config_refuses_a_non_loopback_listen_without_keys(
    tmp_path: Path, sparkd_cli: Any
) -> None:
    config = tmp_path / "sparkd.toml"
    config.write_text('[gateway]\nlisten = "0.0.0.0:8000"\n')
    r = sparkd_cli("check-config", "--config", str(config))
    assert r.returncode == 2
    assert "gateway.listen" in r.stderr and "gateway.keys_file" in r.stderr
    assert "sparkd gateway-key add" in r.stderr
    empty = tmp_path / "keys.toml"
    empty.write_text("# no keys yet\n")
    empty.chmod(0o600)
    config.write_text(f'[gateway]\nlisten = "0.0.0.0:8000"\nkeys_file = "{empty}"\n')
    r = sparkd_cli("check-config", "--config", str(config))
    assert r.returncode == 2 and "no API keys" in r.stderr
    # The gateway refuses to start the same way.
    r = sparkd_cli("gateway", "--config", str(config))
    assert r.returncode == 2 and "no API keys" in r.stderr
    r = sparkd_cli("gateway-key", "add", "alice", "--file", str(empty))
    assert r.returncode == 0, r.stderr
    secret = r.stdout.strip().splitlines()[-1]
    assert secret.startswith("sk-sparkd-") and secret not in empty.read_text()
    assert auth.read_keys_file(empty).verify(secret) is not None
    r = sparkd_cli("check-config", "--config", str(config))
    assert r.returncode == 0, r.stderr
    empty.chmod(0o644)
    r = sparkd_cli("check-config", "--config", str(config))
    assert r.returncode == 2 and "chmod 0600" in r.stderr
