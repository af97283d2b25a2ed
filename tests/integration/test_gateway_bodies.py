"""The gateway against hostile bodies, as a real `sparkd gateway` process on loopback in front
of a real upstream: `/health` keeps answering within 50 ms while maximal hostile requests are
prepared; malformed bodies (garbage tool_calls, a lone surrogate) get OpenAI-style 4xx, small
(prepared on the loop) and large (in the worker process); past the caps, 400 and 413; and
engines are asked for uncompressed answers (issue 10, items 1 and 7)."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from conftest import free_port
from gateway_harness import Reply, get, post
from test_gateway_swaps import gateway_to

from sparkd.config import GatewayConfig
from sparkd.gateway import stopping
from sparkd.gateway.app import openai_errors
from sparkd.gateway.metrics import Metrics
from sparkd.gateway.state import METRICS

# `sparkd gateway`, with a watch on its event loop: every 5 ms it wakes, and when the loop
# spent more than 5 ms of CPU time since the last wake (running callbacks: nothing else could
# run, /health included), it says how much on stderr. CPU time, not wall time: on the shared
# test machine the process also waits for a core (100s of ms when it is loaded), which is not
# the gateway's doing; on the Spark it has cores to spare.
GATEWAY = """
import asyncio, sys, time
from sparkd.gateway import app
from sparkd.main import main

async def watch():
    while True:
        cpu = time.thread_time()
        await asyncio.sleep(0.005)
        busy = time.thread_time() - cpu
        if busy > 0.005:
            print(f"LOOP_BUSY_MS {busy * 1000:.1f}", file=sys.stderr, flush=True)

def tune_gc():
    tuned()
    tasks.append(asyncio.get_running_loop().create_task(watch()))

tasks = []
tuned, app.tune_gc = app.tune_gc, tune_gc
main()
"""
MAX_BODY = GatewayConfig().max_body_bytes  # the defaults are the caps under test
HEALTH_BUDGET_S = 0.050


class GatewayProcess:
    def __init__(self, proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.log = log

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> list[int]:
        children = Path(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children")
        return [int(pid) for pid in children.read_text().split()]


# The engine: a process of its own (in the test's, its reading of 8 MiB bodies would hold up
# the test's /health polls), and a cheap one (the machine's two cores go to the gateway and its
# worker): it reads the body and answers with its size.
UPSTREAM = """
import sys
from aiohttp import web

async def chat(request):
    return web.json_response({"choices": [{"message": {"content": "ok"}}],
                              "got_bytes": len(await request.read())})

app = web.Application(client_max_size=64 * 1024 * 1024)
app.router.add_post("/v1/chat/completions", chat)
app.router.add_post("/v1/embeddings", chat)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None, access_log=None)
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    upstream_port = free_port()
    # Long-lived (tests/conftest.py): these outlive each test, not the module, and this
    # fixture stops them (the gateway's worker with it).
    env = {**os.environ, "SPARKD_TEST_LONG_LIVED": "1"}
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(upstream_port)], env=env,
                                stdin=subprocess.DEVNULL)
    try:
        yield from _gateway(tmp_path_factory, upstream_port, env)
    finally:
        stop(upstream)


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def _gateway(tmp_path_factory: pytest.TempPathFactory, upstream_port: int,
             env: dict[str, str]) -> Iterator[GatewayProcess]:
    workdir = tmp_path_factory.mktemp("gateway-limits")
    port = free_port()
    config = workdir / "sparkd.toml"
    config.write_text(f"""
[daemon]
control_socket = "{workdir}/control.sock"

[gateway]
listen = "127.0.0.1:{port}"

[models.ext]
engine = "external"
url = "http://127.0.0.1:{upstream_port}"
role_policy = "strict"
""")
    log = workdir / "gateway.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", GATEWAY, "gateway", "--config", str(config)],
                                stdin=subprocess.DEVNULL, stdout=out,
                                stderr=subprocess.STDOUT, env=env)
    gw = GatewayProcess(proc, port, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            with contextlib.suppress(OSError):
                if get(gw.url + "/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the gateway did not start:\n{log.read_text()}")
            time.sleep(0.05)
        yield gw
    finally:
        stop(proc)


def chat(*messages: Any, **extra: Any) -> bytes:
    return json.dumps({"model": "ext", "messages": list(messages), **extra}).encode()


def send(gw: GatewayProcess, raw: bytes, timeout: float = 120,
         route: str = "/v1/chat/completions") -> Reply:
    return post(gw.url + route, content=raw, headers={"Content-Type": "application/json"},
                timeout=timeout)


def openai_error(reply: Reply) -> dict[str, Any]:
    assert reply.headers.get("Content-Type", "").startswith("application/json"), reply.text
    error: dict[str, Any] = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


# --- item 7: malformed bodies ----------------------------------------------------------------

PADDING = {"role": "user", "content": "p" * 20_000}  # makes a body large: the worker's


@pytest.mark.parametrize("large", [False, True], ids=["on-the-loop", "in-the-worker"])
@pytest.mark.parametrize("calls", [5, True, [1], {}], ids=["5", "true", "[1]", "{}"])
def test_garbage_tool_calls_are_an_openai_400(gateway: GatewayProcess, calls: Any,
                                              large: bool) -> None:  # noqa: FBT001
    user = PADDING if large else {"role": "user", "content": "a"}
    r = send(gateway, chat(user, {"role": "assistant", "content": "x", "tool_calls": calls},
                           {"role": "user", "content": "b"}))
    assert r.status_code == 400, r.text
    error = openai_error(r)
    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_type")
    assert error["message"].startswith("messages[1].tool_calls")


@pytest.mark.parametrize("large", [False, True], ids=["on-the-loop", "in-the-worker"])
def test_a_lone_surrogate_is_an_openai_400(gateway: GatewayProcess,
                                           large: bool) -> None:  # noqa: FBT001
    raw = chat(PADDING if large else {"role": "user", "content": "a"},
               {"role": "user", "content": "SURROGATE"}).replace(b"SURROGATE", rb"\ud800")
    r = send(gateway, raw)
    assert r.status_code == 400, r.text
    assert openai_error(r)["code"] == "invalid_unicode"


def test_past_the_caps_an_openai_4xx(gateway: GatewayProcess) -> None:
    r = send(gateway, chat(*[{"role": "user", "content": "a"}] * 4097))
    assert r.status_code == 400 and openai_error(r)["code"] == "too_many_messages"
    parts = [{"type": "text", "text": "a"}] * 16385
    r = send(gateway, chat({"role": "user", "content": parts}))
    assert r.status_code == 400 and openai_error(r)["code"] == "too_many_parts"
    r = send(gateway, chat({"role": "user", "content": "a" * MAX_BODY}))
    assert r.status_code == 413 and openai_error(r)["code"] == "body_too_large"


def test_a_large_body_is_rewritten_in_the_worker_and_relayed(gateway: GatewayProcess) -> None:
    raw = chat(*[{"role": "user", "content": "w"}] * 4000)
    assert len(raw) > 16 * 1024
    r = send(gateway, raw)
    assert r.status_code == 200, r.text
    assert r.headers["X-Sparkd-Rewrites"] == "3999"
    assert r.json()["got_bytes"] < len(raw)  # one message now


def test_a_killed_worker_is_replaced(gateway: GatewayProcess) -> None:
    raw = chat(PADDING, {"role": "user", "content": "b"})
    assert send(gateway, raw).status_code == 200
    (pid,) = gateway.worker_pids()
    os.kill(pid, signal.SIGKILL)
    replies = [send(gateway, raw) for _ in range(2)]
    # The first may find the dead worker's pipe (503 worker_failed), never a plain 500.
    assert replies[-1].status_code == 200, replies[-1].text
    assert all(r.status_code == 200 or openai_error(r)["code"] == "worker_failed"
               for r in replies)
    assert gateway.worker_pids() != [pid]


# --- item 1: /health while maximal hostile requests are prepared ------------------------------


def hostile_bodies() -> dict[str, bytes]:
    """Maximal requests (at max_body_bytes, max_messages) of the shapes that were slow; the
    one named for a route goes there (the others to /v1/chat/completions)."""
    room = MAX_BODY - 1000
    return {
        "/v1/embeddings": json.dumps({"model": "ext", "input": "a", "x": [[]] * (room // 4)}
                                     ).encode(),
        "long line, no colon": chat({"role": "user", "content": "def " + "a" * room}),
        "short lines": chat({"role": "user", "content": "a\n" * (room // 3)}),
        "4096 same-role messages": chat(*[{"role": "user", "content": "w" * (room // 4096 - 40)}]
                                        * 4096),
        "structure": chat({"role": "user", "content": "a"}, x=[[]] * (room // 4)),
        "inline, short lines": chat({"role": "user", "content": "a\n" * 7000}),
    }


def test_health_answers_within_50ms_while_maximal_hostile_requests_are_prepared(
    gateway: GatewayProcess
) -> None:
    bodies = hostile_bodies()
    assert all(len(raw) <= MAX_BODY for raw in bodies.values())
    idle = [health_latency(gateway) for _ in range(100)]
    log_offset = gateway.log.stat().st_size
    served: dict[str, int] = {}
    done = threading.Event()

    def attack() -> None:
        try:
            for name, raw in bodies.items():
                route = name if name.startswith("/") else "/v1/chat/completions"
                for _ in range(2 if len(raw) > 1_000_000 else 30):
                    served[name] = send(gateway, raw, route=route).status_code
        finally:
            done.set()

    attacker = threading.Thread(target=attack, name="attacker")
    attacker.start()
    latencies = []
    try:
        while not done.is_set():
            latencies.append(health_latency(gateway))
            time.sleep(0.005)
    finally:
        attacker.join(300)
    assert served == dict.fromkeys(bodies, 200), served  # prepared, and passed on
    with gateway.log.open("rb") as log:
        log.seek(log_offset)
        busy = [float(line.split()[1]) / 1000 for line in log.read().decode().splitlines()
                if line.startswith("LOOP_BUSY_MS ")]
    print(f"/health under attack: {len(latencies)} polls, median"
          f" {statistics.median(latencies) * 1000:.1f} ms, worst {max(latencies) * 1000:.1f} ms"
          f" (idle: median {statistics.median(idle) * 1000:.1f} ms, worst"
          f" {max(idle) * 1000:.1f} ms); the loop's longest busy stretch"
          f" {max(busy, default=0) * 1000:.1f} ms of CPU ({len(busy)} over 5 ms)")
    assert len(latencies) > 20
    # Nothing kept the loop (and so /health) waiting 50 ms: measured as the loop's CPU time,
    # which the machine's other load does not lengthen much.
    assert max(busy, default=0) < HEALTH_BUDGET_S, sorted(busy)[-5:]
    # And as /health's own latency, which it does: half of the answers within 50 ms, and
    # none near the seconds one hostile body held the loop before.
    assert statistics.median(latencies) < HEALTH_BUDGET_S
    assert max(latencies) < 1.0, sorted(latencies)[-5:]


def health_latency(gw: GatewayProcess) -> float:
    started = time.perf_counter()
    r = get(gw.url + "/health", timeout=30)
    elapsed = time.perf_counter() - started
    assert r.status_code == 200
    return elapsed


# --- item 7: compressed answers ----------------------------------------------------------------


def test_engines_are_asked_for_uncompressed_answers() -> None:
    """aiohttp asks for gzip unless told otherwise; the gateway passed the gzip bytes on as
    the body, without their Content-Encoding."""
    seen: list[str | None] = []

    async def compressing(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Accept-Encoding"))
        response = web.json_response({"choices": [{"message": {"content": "x" * 2000}}]})
        response.enable_compression()  # as the client's Accept-Encoding allows
        return response

    with gateway_to(compressing) as gw:
        r = post(gw.url + "/v1/chat/completions", json_body={
            "model": "ext", "messages": [{"role": "user", "content": "hi"}]},
            headers={"Accept-Encoding": "gzip"})
    assert seen == ["identity"]
    assert r.status_code == 200 and "Content-Encoding" not in r.headers
    assert r.json()["choices"][0]["message"]["content"] == "x" * 2000


def test_an_engine_that_compresses_anyway_is_decoded_or_labelled() -> None:
    async def always_gzip(request: web.Request) -> web.Response:
        if (await request.json())["messages"][0]["content"] == "fail":
            response = web.json_response({"object": "error", "message": "the engine's reason",
                                          "type": "BadRequestError", "code": 400}, status=400)
        else:
            response = web.json_response({"choices": [{"message": {"content": "ok"}}]})
        response.headers["Content-Encoding"] = "gzip"
        response.body = gzip.compress(response.body)  # type: ignore[arg-type]
        return response

    with gateway_to(always_gzip) as gw:
        ok = post(gw.url + "/v1/chat/completions", json_body={
            "model": "ext", "messages": [{"role": "user", "content": "hi"}]})
        failed = post(gw.url + "/v1/chat/completions", json_body={
            "model": "ext", "messages": [{"role": "user", "content": "fail"}]})
    assert ok.status_code == 200 and ok.headers["Content-Encoding"] == "gzip"
    assert json.loads(gzip.decompress(ok.content))["choices"][0]["message"]["content"] == "ok"
    assert failed.status_code == 400 and "Content-Encoding" not in failed.headers
    assert openai_error(failed)["message"] == "the engine's reason"


def test_a_bug_is_an_openai_500_not_a_plain_text_traceback(
    caplog: pytest.LogCaptureFixture
) -> None:
    async def bug(_request: web.Request) -> web.StreamResponse:
        raise KeyError("the secret detail")

    async def scenario() -> tuple[int, str, str]:
        app = web.Application()
        app[METRICS] = Metrics()
        stopping.track(app)  # as build_app does: the route's handlers are tracked for a stop
        app.router.add_post("/v1/chat/completions", openai_errors(bug))
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            async with aiohttp.ClientSession() as session, session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", data=b"{}") as r:
                return r.status, r.headers["Content-Type"], await r.text()
        finally:
            await runner.cleanup()

    status, content_type, text = asyncio.run(scenario())
    assert status == 500 and content_type.startswith("application/json")
    error = json.loads(text)["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert "secret" not in text  # the traceback is the log's, not the client's
    assert "KeyError: 'the secret detail'" in caplog.text
