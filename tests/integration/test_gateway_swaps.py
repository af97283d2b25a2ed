"""The gateway through loads and swaps, driven by a fake daemon's event stream: requests held
while the model loads or a swap runs and served when it is healthy; the bounded queue and hold
time; on-demand swaps and their minimum interval; idle unloads; reconnecting to a restarted
daemon; variant dispatch over two engines; client disconnects; unreachable engines."""

from __future__ import annotations

import contextlib
import dataclasses
import http.client
import json
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import status_builders as sb
from aiohttp import web
from conftest import SimEngine, SimEngines
from gateway_harness import (
    Gateway,
    Reply,
    engine_entry,
    free_port,
    get,
    post,
    running_gateway,
)

from sparkd.control.status import EngineRecord, SwapRecord

MODEL = "sim-a"
OTHER = "sim-b"
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "hello there"}],
        "max_tokens": 8}


@pytest.fixture(scope="module")
def engine(module_sim_engines: SimEngines) -> SimEngine:
    e = module_sim_engines.start("--load-seconds", "0", "--tokens-per-second", "5000",
                                 model=MODEL)
    e.wait_health(200)
    return e


def config(port: int, *, gateway: str = "", model_extra: str = "") -> str:
    return f"""
[gateway]
listen = "{{listen}}"
{gateway}

[models.{MODEL}]
engine = "sim"
port = {port}
{model_extra}

[models.{OTHER}]
engine = "sim"
port = {port + 1 if port < 65535 else 1}
"""


def in_thread(fn: Any) -> tuple[threading.Thread, list[Any]]:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    return t, out


def wait_for(predicate: Any, timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def held(gw: Gateway) -> int:
    n: int = get(gw.url + "/health").json()["held_requests"]
    return n


def test_request_waits_while_loading_and_is_served_when_healthy(engine: SimEngine) -> None:
    loading = sb.status(active_model=MODEL,
               engines=[engine_entry(MODEL, engine.port, active_state="activating",
                                        healthy=False)])
    with running_gateway(config(engine.port, gateway="hold_seconds = 10"),
                         initial=loading) as gw:
        t, out = in_thread(lambda: post(gw.url + "/v1/chat/completions", json_body=CHAT))
        wait_for(lambda: held(gw) == 1)
        assert "sparkd_gateway_held_requests 1.0" in get(gw.url + "/metrics").text
        gw.set_status(engines=[engine_entry(MODEL, engine.port)], active_model=MODEL)
        t.join(10)
        reply: Reply = out[0]
        assert reply.status_code == 200, reply.text
        assert held(gw) == 0


def test_request_waits_through_a_swap(engine: SimEngine) -> None:
    swapping = sb.status(active_model=None,
                swap=sb.swap(MODEL, from_model=OTHER, step="stop"),
                engines=[engine_entry(OTHER, 1, active_state="deactivating", healthy=False)])
    with running_gateway(config(engine.port, gateway="hold_seconds = 10"),
                         initial=swapping) as gw:
        t, out = in_thread(lambda: post(gw.url + "/v1/chat/completions", json_body=CHAT))
        wait_for(lambda: held(gw) == 1)
        assert get(gw.url + "/health").json()["daemon"]["swap"]["to"] == MODEL
        # A step changes: still held.
        gw.set_status(engines=[], swap=sb.swap(MODEL, from_model=OTHER, step="start"),
                      event="swap_step")
        time.sleep(0.1)
        assert held(gw) == 1 and t.is_alive()
        gw.set_status(engines=[engine_entry(MODEL, engine.port)], active_model=MODEL,
                      event="swap_done", ended=sb.swap(MODEL, from_model=OTHER, step="done"))
        t.join(10)
        assert out[0].status_code == 200


def test_hold_time_and_queue_limit_give_503_with_retry_after(engine: SimEngine) -> None:
    loading = sb.status(active_model=MODEL,
               engines=[engine_entry(MODEL, engine.port, active_state="activating",
                                        healthy=False)])
    with running_gateway(config(engine.port, gateway="hold_seconds = 1.5\nqueue_limit = 1"),
                         initial=loading) as gw:
        t, out = in_thread(lambda: post(gw.url + "/v1/chat/completions", json_body=CHAT))
        wait_for(lambda: held(gw) == 1)
        full = post(gw.url + "/v1/chat/completions", json_body=CHAT)
        assert full.status_code == 503 and full.json()["error"]["code"] == "queue_full"
        assert int(full.headers["Retry-After"]) >= 1
        t.join(10)
        timed_out: Reply = out[0]
        assert timed_out.status_code == 503
        assert timed_out.json()["error"]["code"] == "model_loading"
        assert "hold_seconds" in timed_out.json()["error"]["message"]
        assert int(timed_out.headers["Retry-After"]) >= 1


def test_inactive_model_is_refused_without_swap_on_demand(engine: SimEngine) -> None:
    status = sb.status(active_model=OTHER,
              engines=[engine_entry(OTHER, 1)])
    with running_gateway(config(engine.port), initial=status) as gw:
        wait_for(lambda: get(gw.url + "/health").json()["loaded"] == [OTHER])
        r = post(gw.url + "/v1/chat/completions", json_body=CHAT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_loaded"
        assert "sparkctl swap sim-a" in r.json()["error"]["message"]
        assert not [c for c in gw.daemon.calls if c[0] == "swap"]


def test_swap_on_demand_starts_a_swap_and_throttles_the_next(engine: SimEngine) -> None:
    status = sb.status(active_model=OTHER,
              engines=[engine_entry(OTHER, 1)])
    gateway = "swap_on_demand = true\nswap_min_interval_s = 60\nhold_seconds = 10"
    with running_gateway(config(engine.port, gateway=gateway), initial=status) as gw:
        wait_for(lambda: get(gw.url + "/health").json()["loaded"] == [OTHER])
        t, out = in_thread(lambda: post(gw.url + "/v1/chat/completions", json_body=CHAT))
        wait_for(lambda: ("swap", {"model": MODEL}) in gw.daemon.calls)
        # A second request for the same model waits for the same swap (no second swap).
        t2, out2 = in_thread(lambda: post(gw.url + "/v1/chat/completions", json_body=CHAT))
        wait_for(lambda: held(gw) == 2)
        gw.set_status(engines=[], swap=sb.swap(MODEL, from_model=OTHER, step="stop"),
                      event="swap_step")
        gw.set_status(engines=[engine_entry(MODEL, engine.port)], active_model=MODEL,
                      event="swap_done", ended=sb.swap(MODEL, from_model=OTHER, step="done"))
        t.join(10)
        t2.join(10)
        assert out[0].status_code == 200 and out2[0].status_code == 200
        assert [c for c in gw.daemon.calls if c[0] == "swap"] == [("swap", {"model": MODEL})]
        # Alternating clients cannot thrash: the other model is refused for now.
        r = post(gw.url + "/v1/chat/completions", json_body={**CHAT, "model": OTHER})
        assert r.status_code == 503 and r.json()["error"]["code"] == "swap_throttled"
        assert 1 <= int(r.headers["Retry-After"]) <= 60
        assert len([c for c in gw.daemon.calls if c[0] == "swap"]) == 1


def test_swap_refused_or_failed_by_the_daemon_is_a_503(engine: SimEngine) -> None:
    status = sb.status(active_model=OTHER,
              engines=[engine_entry(OTHER, 1)])
    gateway = "swap_on_demand = true\nswap_min_interval_s = 30\nhold_seconds = 10"
    with running_gateway(config(engine.port, gateway=gateway), initial=status) as gw:
        wait_for(lambda: get(gw.url + "/health").json()["loaded"] == [OTHER])
        gw.daemon.refuse["swap"] = "unknown method 'swap'"
        r = post(gw.url + "/v1/chat/completions", json_body=CHAT)
        assert r.status_code == 503 and r.json()["error"]["code"] == "swap_failed"
        assert "unknown method" in r.json()["error"]["message"]
        del gw.daemon.refuse["swap"]
        # A refused swap is neither waited for nor throttled: the next request asks again.
        t, out = in_thread(lambda: post(gw.url + "/v1/chat/completions", json_body=CHAT))
        wait_for(lambda: held(gw) == 1)
        t2, out2 = in_thread(lambda: post(gw.url + "/v1/chat/completions", json_body=CHAT))
        wait_for(lambda: held(gw) == 2)  # waits for the same swap
        failed = sb.swap(MODEL, from_model=OTHER, step="rolled_back",
                         failure="health_gate: engine exited 1")
        gw.run(lambda: _publish_failure(gw, failed, engine_entry(OTHER, 1)))
        t.join(10)
        t2.join(10)
        for reply in (out[0], out2[0]):
            assert reply.status_code == 503
            assert reply.json()["error"]["code"] == "swap_failed"
            assert "health_gate: engine exited 1; rolled back to sim-b" in (
                reply.json()["error"]["message"])
        assert len([c for c in gw.daemon.calls if c[0] == "swap"]) == 2  # refused, then one


async def _publish_failure(gw: Gateway, swap: SwapRecord, serving: EngineRecord) -> None:
    """The daemon's swap_failed: the swap record, and the status with no swap running."""
    gw.daemon.status = sb.status(engines=[serving], active_model=serving.model)
    gw.daemon.publish("swap_failed", swap=swap)


def test_follows_a_restarted_daemon_without_polling(engine: SimEngine) -> None:
    status = sb.status(active_model=MODEL,
              engines=[engine_entry(MODEL, engine.port)])
    with running_gateway(config(engine.port), initial=status) as gw:
        wait_for(lambda: gw.daemon.subscribers == 1)
        wait_for(lambda: get(gw.url + "/health").json()["daemon"]["connected"])

        async def stop() -> None:
            gw.daemon.drop_subscribers()
            await gw.daemon.server.close()

        gw.run(stop)
        wait_for(lambda: not get(gw.url + "/health").json()["daemon"]["connected"])
        # Engines outlive sparkd: the last known route still serves.
        assert post(gw.url + "/v1/chat/completions", json_body=CHAT).status_code == 200
        gw.daemon.status = dataclasses.replace(status, engines=(
            engine_entry(MODEL, engine.port), engine_entry(OTHER, 1)))
        gw.run(gw.daemon.server.start)
        wait_for(lambda: get(gw.url + "/health").json()["loaded"] == [MODEL, OTHER], 10)
        assert get(gw.url + "/health").json()["daemon"]["connected"]
        assert "sparkd_gateway_daemon_connected 1.0" in get(gw.url + "/metrics").text
        assert [c for c in gw.daemon.calls if c[0] == "status"] == []  # events, not polls


def test_idle_model_is_unloaded_after_its_minutes(engine: SimEngine) -> None:
    now = [1000.0]
    status = sb.status(active_model=MODEL,
              engines=[engine_entry(MODEL, engine.port)])
    with running_gateway(config(engine.port, model_extra="idle_unload_minutes = 0.1"),
                         initial=status, clock=lambda: now[0]) as gw:
        wait_for(lambda: get(gw.url + "/health").json()["loaded"] == [MODEL])
        assert post(gw.url + "/v1/chat/completions", json_body=CHAT).status_code == 200
        now[0] += 5  # not yet 6 s idle
        time.sleep(1.7)  # the checker runs every idle_unload_minutes/4
        assert not [c for c in gw.daemon.calls if c[0] == "unload"]
        now[0] += 2
        wait_for(lambda: ("unload", {"model": MODEL}) in gw.daemon.calls, 5)


@pytest.fixture(scope="module")
def two_variants(module_sim_engines: SimEngines) -> Iterator[tuple[SimEngine, SimEngine]]:
    plain = module_sim_engines.start("--load-seconds", "0", "--tokens-per-second", "1000",
                                     model="sim-spec")
    spec = module_sim_engines.start("--load-seconds", "0", "--tokens-per-second", "1000",
                                    "--speculative", model="sim-spec")
    plain.wait_health(200)
    spec.wait_health(200)
    yield plain, spec


SPEC_MODEL = """
[models.sim-spec]
engine = "sim"
port = {port}
[models.sim-spec.speculative]
method = "eagle3"
draft_model = "/models/draft"
{extra}
"""
STRUCTURED = {"model": "sim-spec", "max_tokens": 40,
              "messages": [{"role": "user", "content": "give JSON"}],
              "response_format": {"type": "json_object"}}
FREE = {"model": "sim-spec", "max_tokens": 40,
        "messages": [{"role": "user", "content": "tell me a story"}]}


def spec_gateway(plain: SimEngine, spec: SimEngine, extra: str, *, both: bool = True
                 ) -> Any:
    engines = [engine_entry("sim-spec", plain.port, variant="plain")]
    if both:
        engines.append(engine_entry("sim-spec", spec.port, variant="speculative"))
    status = sb.status(active_model="sim-spec",  engines=engines)
    text = '[gateway]\nlisten = "{listen}"\n' + SPEC_MODEL.format(port=plain.port, extra=extra)
    return running_gateway(text, initial=status, draw=lambda: 0.5)


def test_static_dispatch_sends_structured_to_plain_and_chat_to_speculative(
    two_variants: tuple[SimEngine, SimEngine]
) -> None:
    plain, spec = two_variants
    with spec_gateway(plain, spec, "") as gw:
        wait_for(lambda: get(gw.url + "/health").json()["loaded"] == ["sim-spec"])
        s = post(gw.url + "/v1/chat/completions", json_body=STRUCTURED)
        f = post(gw.url + "/v1/chat/completions", json_body=FREE)
        assert (s.headers["X-Sparkd-Variant"], s.headers["X-Sparkd-Workload"]) == (
            "plain", "structured")
        assert (f.headers["X-Sparkd-Variant"], f.headers["X-Sparkd-Workload"]) == (
            "speculative", "chat")
    with spec_gateway(plain, spec, "", both=False) as gw:  # memory allows one: plain
        wait_for(lambda: get(gw.url + "/health").json()["loaded"] == ["sim-spec"])
        f = post(gw.url + "/v1/chat/completions", json_body=FREE)
        assert f.status_code == 200 and f.headers["X-Sparkd-Variant"] == "plain"


def test_measured_dispatch_learns_the_faster_variant_per_class(
    two_variants: tuple[SimEngine, SimEngine]
) -> None:
    plain, spec = two_variants
    extra = 'dispatch = "measured"\nmin_samples = 3\nrecheck_share = 0.0'
    with spec_gateway(plain, spec, extra) as gw:
        wait_for(lambda: get(gw.url + "/health").json()["loaded"] == ["sim-spec"])
        seen = []
        for _ in range(10):
            for body in (STRUCTURED, FREE):
                r = post(gw.url + "/v1/chat/completions", json_body=body)
                seen.append((r.headers["X-Sparkd-Workload"], r.headers["X-Sparkd-Variant"]))
        # Measuring first (both variants sampled), then each class on its faster variant.
        assert {v for w, v in seen[:12] if w == "chat"} == {"plain", "speculative"}
        assert [v for w, v in seen[-6:] if w == "chat"] == ["speculative"] * 3
        assert [v for w, v in seen[-6:] if w == "structured"] == ["plain"] * 3
        stats = get(gw.url + "/health").json()["dispatch"]["sim-spec"]
        assert stats["chat/speculative"]["tokens_per_s"] > stats["chat/plain"]["tokens_per_s"]


def test_client_disconnect_cancels_the_upstream_stream(sim_engines: SimEngines) -> None:
    slow = sim_engines.start("--load-seconds", "0", "--tokens-per-second", "20", model=MODEL)
    slow.wait_health(200)
    status = sb.status(active_model=MODEL,
              engines=[engine_entry(MODEL, slow.port)])
    with running_gateway(config(slow.port), initial=status) as gw:
        wait_for(lambda: get(gw.url + "/health").json()["loaded"] == [MODEL])
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=10)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(
            {**CHAT, "stream": True, "max_tokens": 400}),
            headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        assert response.read1(4096).startswith(b"data:")
        conn.close()
        wait_for(lambda: "client went away during a stream" in slow.log(), 10)


def test_unreachable_engine_is_a_502_and_external_models_are_routed(
    engine: SimEngine, sim_engines: SimEngines
) -> None:
    external = sim_engines.start("--load-seconds", "0", model="ext")
    external.wait_health(200)
    dead = 1  # nothing listens on port 1
    status = sb.status(active_model=MODEL,
              engines=[engine_entry(MODEL, dead)])
    text = config(engine.port) + f"""
[models.ext]
engine = "external"
url = "{external.openai_url.removesuffix('/v1')}"
"""
    with running_gateway(text, initial=status) as gw:
        wait_for(lambda: get(gw.url + "/health").json()["loaded"] == [MODEL])
        r = post(gw.url + "/v1/chat/completions", json_body=CHAT)
        assert r.status_code == 502 and r.json()["error"]["code"] == "upstream_unreachable"
        # Not supervised, not in the daemon's status: routed all the same.
        r = post(gw.url + "/v1/chat/completions", json_body={**CHAT, "model": "ext"})
        assert r.status_code == 200 and r.json()["model"] == "ext"


@contextlib.contextmanager
def gateway_to(handler: Callable[[web.Request], Awaitable[web.StreamResponse]], *,
               host: str = "127.0.0.1") -> Iterator[Gateway]:
    """A gateway whose one model, `ext`, is an external engine: `handler` answering its
    /v1/chat/completions on loopback, named by `host` in the config."""
    port = free_port()
    text = f"""
[gateway]
listen = "{{listen}}"
[models.ext]
engine = "external"
url = "http://{host}:{port}"
"""
    with running_gateway(text, initial=sb.status(engines=[])) as gw:
        upstream = web.Application()
        upstream.router.add_post("/v1/chat/completions", handler)
        runner = web.AppRunner(upstream, access_log=None)

        async def start() -> None:
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", port).start()

        gw.run(start)
        try:
            yield gw
        finally:
            gw.run(runner.cleanup)


def test_a_stream_that_breaks_ends_with_an_openai_error_event() -> None:
    async def broken(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b'data: {"choices": [{"delta": {"content": "Hel"}}]}\n\n')
        assert request.transport is not None
        request.transport.abort()  # the engine dies mid-answer
        return response

    with gateway_to(broken) as gw:
        r = post(gw.url + "/v1/chat/completions",
                 json_body={"model": "ext", "stream": True,
                            "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 200
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    assert events[0].startswith('data: {"choices"')
    error = json.loads(events[-1].removeprefix("data: "))["error"]
    assert error["code"] == "upstream_error" and "broke" in error["message"]


def test_a_cookie_an_engine_sets_is_not_sent_with_other_clients_requests() -> None:
    """One upstream session serves every client: a cookie jar in it would hand one client's
    session cookie (set by an engine or a proxy in front of it) to the next client."""
    seen: list[str | None] = []

    async def chat(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        response = web.json_response({"choices": [{"message": {"content": "ok"}}]})
        response.set_cookie("session", "client-one-secret")
        return response

    # A host name: a jar keeps no cookies of IP addresses.
    with gateway_to(chat, host="localhost") as gw:
        body = {"model": "ext", "messages": [{"role": "user", "content": "hi"}]}
        first = post(gw.url + "/v1/chat/completions", json_body=body)
        second = post(gw.url + "/v1/chat/completions", json_body=body)
    assert first.status_code == 200 and second.status_code == 200
    assert seen == [None, None]
