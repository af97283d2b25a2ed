"""The gateway's aiohttp adapter: one OpenAI-compatible endpoint in front of sparkd's engines.

Per request: validate the body, classify the workload, rewrite the messages for the model's
role policy, find the engine (holding while it loads or a swap runs), pick the variant, and
relay the answer (SSE chunk by chunk). The decisions are the pure modules' (rewrite, classify,
dispatch, routing); this module does the HTTP both ways and the on-demand swap call;
`daemon_link` follows the daemon's events and asks for idle unloads; `state` holds the typed
app state.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import gc
import json
import logging
import time
import zlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Final

import aiohttp
import yarl
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from sparkd.config import Config, GatewayConfig, ModelConfig, Variant
from sparkd.errors import SparkdError
from sparkd.gateway import (
    auth,
    classify,
    daemon_link,
    dispatch,
    door,
    prepare,
    routes,
    routing,
    stopping,
)
from sparkd.gateway.errors import GatewayError, error_body, upstream_error_body
from sparkd.gateway.metrics import Metrics, child
from sparkd.gateway.state import (
    CONFIG,
    METRICS,
    SESSION,
    STATE,
    WORKER,
    GatewayState,
    Settings,
    SettingsHolder,
    settings_for,
)
from sparkd.gateway.worker import INLINE_MAX_BYTES, PrepareWorker
from sparkd.journal import event

__all__ = ["apply_config", "build_app", "serve", "settings_for"]

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

log = logging.getLogger(__name__)

WORKLOAD_HEADER: Final = "X-Sparkd-Workload"
REWRITES_HEADER: Final = "X-Sparkd-Rewrites"
VARIANT_HEADER: Final = "X-Sparkd-Variant"
# Request headers passed to the engine; the rest (hop-by-hop, Host, our own) are not. With
# gateway keys on, the client's Authorization is the gateway's key: not passed on.
FORWARDED: Final = ("Content-Type", "Accept", "Authorization", "User-Agent", "X-Request-Id",
                    "OpenAI-Organization", "OpenAI-Project")
# Asked of every engine: answers come back uncompressed (the client's Accept-Encoding is not
# passed on; without this aiohttp asks for gzip, and the gzip bytes went to the client as if
# they were the body). An engine that compresses anyway has its Content-Encoding passed on.
UPSTREAM_ACCEPT_ENCODING: Final = "identity"

FORWARDED_WITH_KEYS: Final = tuple(h for h in FORWARDED if h != "Authorization")


def build_app(settings: Settings, *, subscribe: bool = True, keys: auth.Keys | None = None,
              nofile: int | None = None) -> web.Application:
    """The gateway's app. `keys`: the API keys (None: read from gateway.keys_file or the
    unit's credential); `nofile`: the descriptor limit the connection limit keeps under
    (None: this process's)."""
    # Errors are caught by `openai_errors` around the one route, not by a middleware: a
    # middleware is a measurable share of a proxied request's cost.
    gateway = settings.config.gateway
    app = web.Application(client_max_size=gateway.max_body_bytes)
    app[CONFIG] = SettingsHolder(settings)
    app[STATE] = GatewayState(serving=routing.serving_table(settings.config,
                                                            routing.DaemonView()))
    app[METRICS] = Metrics()
    stopping.track(app)
    _install_door(app, gateway, keys, nofile)
    app.cleanup_ctx.append(_client_session)
    app.cleanup_ctx.append(_prepare_worker)
    if subscribe:
        app.cleanup_ctx.append(daemon_link.daemon_events)
    if any(m.idle_unload_minutes for m in settings.config.models.values()):
        app.cleanup_ctx.append(daemon_link.idle_unloader)
    # One route: the door matches the request target against routes.ROUTES itself, after
    # normalizing it (aiohttp's router would match the decoded, unnormalized path).
    app.router.add_route("*", "/{tail:.*}", openai_errors(front))
    return app


def _install_door(app: web.Application, gateway: GatewayConfig, keys: auth.Keys | None,
                  nofile: int | None) -> None:
    m = app[METRICS]
    app[door.DOOR] = door.door_for(
        gateway, auth.load_keys(gateway.keys_file) if keys is None else keys,
        on_close=lambda reason: child(m.connections_closed, reason).inc())
    limit = door.connection_limit(gateway.max_connections,
                                  door.nofile_limit() if nofile is None else nofile)
    app[door.GUARD] = door.ConnectionGuard(
        limit=limit, header_timeout_s=gateway.header_timeout_s,
        idle_timeout_s=gateway.idle_timeout_s, body_timeout_s=gateway.body_timeout_s,
        on_close=lambda reason: child(m.connections_closed, reason).inc())
    m.connections.set_function(lambda: len(app[door.GUARD]))
    m.body_bytes.set_function(lambda: app[door.DOOR].in_flight)
    app.cleanup_ctx.append(door.sweeper)


# --- background tasks (cleanup_ctx) ----------------------------------------------------------


async def _client_session(app: web.Application) -> AsyncIterator[None]:
    timeout = aiohttp.ClientTimeout(
        total=None, sock_connect=10, sock_read=app[CONFIG].current.config.gateway.upstream_timeout_s
    )
    # As many connections to engines as the guard allows clients: descriptors stay bounded.
    connector = aiohttp.TCPConnector(limit=app[door.GUARD].limit, keepalive_timeout=60)
    # No cookie jar: one session serves every client, so a jar would hand a cookie that one
    # client's answer set to the next client (tests/integration/test_gateway_swaps.py). It
    # is also a per-request cost.
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, auto_decompress=False,
        cookie_jar=aiohttp.DummyCookieJar(),
    ) as session:
        app[SESSION] = session
        yield


async def _prepare_worker(app: web.Application) -> AsyncIterator[None]:
    worker = app[WORKER] = PrepareWorker()  # its process starts with the first large body
    yield
    await worker.close()


# --- errors ----------------------------------------------------------------------------------


def openai_errors(handler: Handler) -> Handler:
    """Every error leaves as an OpenAI-style body, aiohttp's own 413 and a bug's 500
    included."""

    @functools.wraps(handler)
    async def handle(request: web.Request) -> web.StreamResponse:
        in_flight = request.app[stopping.IN_FLIGHT]  # a stop waits for it, then cancels it
        task = asyncio.current_task()
        if task is not None:
            in_flight.add(task)
        try:
            return await handler(request)
        except GatewayError as exc:
            child(request.app[METRICS].refused, exc.code).inc()
            return web.json_response(exc.body(), status=exc.status, headers=exc.headers())
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = "body_too_large" if exc.status == 413 else "bad_request"
            message = exc.reason
            if exc.status == 413:
                limit = request.app[CONFIG].current.config.gateway.max_body_bytes
                message = f"request body too large (limit {limit} bytes: gateway.max_body_bytes)"
            child(request.app[METRICS].refused, code).inc()
            return web.json_response(error_body(exc.status, code, message), status=exc.status)
        except ConnectionError:
            raise  # the client went away: nobody to answer, nothing to log
        except Exception:
            # A bug: logged with its traceback, and still an OpenAI-style body for the client
            # (aiohttp's own answer is a plain-text 500).
            log.exception("%s %s failed", request.method, request.path)
            child(request.app[METRICS].refused, "internal_error").inc()
            return web.json_response(error_body(
                500, "internal_error", "the gateway failed on this request (a bug: its log"
                " has the traceback)"), status=500)
        finally:
            in_flight.discard(task)

    return handle


class _NoRoute(GatewayError):
    def __init__(self, refusal: routes.NoRoute) -> None:
        super().__init__(refusal.status, refusal.code, refusal.message)
        self.allow = refusal.allow

    def headers(self) -> dict[str, str]:
        return {"Allow": ", ".join(sorted(self.allow))} if self.allow else {}


# --- the door --------------------------------------------------------------------------------


async def front(request: web.Request) -> web.StreamResponse:
    """Every request: its route from the allow-list (normalized target), the door's checks
    (Host, Origin, key, rate, Content-Type), then the route's handler. Nothing reaches a
    handler, reads a body or swaps a model before the door lets it in."""
    found = routes.match(request.method, request.raw_path)
    guard = request.app[door.GUARD]
    guard.request_started(request.transport, body=request.body_exists)
    try:
        if isinstance(found, routes.NoRoute):
            raise _NoRoute(found)
        door.CURRENT.set(door.Pass(found))
        door.admit(request, found)
        return await HANDLERS[found.route.kind](request)
    finally:
        door.release(request)
        guard.request_done(request.transport)


def _match() -> routes.Match:
    found = door.current().match
    assert found is not None
    return found


# --- the OpenAI routes -----------------------------------------------------------------------


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, "/v1/chat/completions", chat=True)


async def completions(request: web.Request) -> web.StreamResponse:
    return await _openai(request, "/v1/completions", chat=False)


async def _openai(request: web.Request, path: str, *, chat: bool) -> web.StreamResponse:
    settings = request.app[CONFIG].current
    prepared = await _prepare(request, await door.read_body(request), settings, chat=chat)
    model = settings.config.models[prepared.model]
    door.check_model(request, model.name)
    serve = await _route(request.app, model)
    variant = _variant(request.app, model, prepared.workload, serve)
    headers = {WORKLOAD_HEADER: prepared.workload, REWRITES_HEADER: str(prepared.changes),
               VARIANT_HEADER: variant}
    return await _relay(
        request, serve.urls[variant] + path, prepared.raw, headers,
        model=model.name, variant=variant, workload=prepared.workload, route=path,
    )


async def _prepare(request: web.Request, raw: bytes, settings: Settings, *, chat: bool
                   ) -> prepare.Prepared:
    """The body parsed, checked, classified and rewritten (`prepare`): on the loop when it is
    small, in the worker process when it is not (docs/gateway.md, "Limits")."""
    workload = classify.parse_override(request.headers.get(WORKLOAD_HEADER))
    user_agent = request.headers.get("User-Agent", "")
    if len(raw) <= INLINE_MAX_BYTES:
        prepared = prepare.prepare(raw, settings.recipe, chat=chat, user_agent=user_agent,
                                   workload=workload)
    else:
        prepared = await request.app[WORKER].prepare(
            raw, settings.recipe, chat=chat, user_agent=user_agent, workload=workload)
    if prepared.changes:
        m = request.app[METRICS]
        child(m.rewrites, prepared.model, prepared.policy).inc(prepared.changes)
        child(m.rewritten_requests, prepared.model, prepared.policy).inc()
        if log.isEnabledFor(logging.DEBUG):
            log.debug("role policy %s rewrote %s's messages (%d changes): %s -> %s",
                      prepared.policy, prepared.model, prepared.changes,
                      ",".join(prepared.roles_before), ",".join(prepared.roles_after))
    return prepared


async def _route(app: web.Application, model: ModelConfig) -> routing.Serve:
    """The engine(s) for the model, waiting (bounded) while it loads or a swap runs."""
    settings, state = app[CONFIG].current, app[STATE]
    ready = state.serving.get(model.name)
    if ready is not None:  # the common case, decided when the status last changed
        state.last_used[model.name] = settings.clock()
        return ready
    m = app[METRICS]
    gateway = settings.config.gateway
    started = settings.clock()
    deadline = started + gateway.hold_seconds
    held = swap_requested = False
    requested_at = 0.0
    try:
        while True:
            now = settings.clock()
            # Waiting for an on-demand swap to this model: this request's, or a recent one
            # another request asked for (it is not asked twice).
            since = requested_at if swap_requested else state.last_swap_request
            waiting = swap_requested or (
                state.last_swap_model == model.name and since is not None
                and now - since < gateway.swap_min_interval_s)
            # A swap to this model that failed while this request waited (for it, or for a
            # swap this request asked for) ends the wait with the daemon's reason.
            failure = state.swap_failures.get(model.name)
            if failure is not None and (failure[0] >= started or (
                    waiting and since is not None and failure[0] >= since)):
                raise GatewayError(503, "swap_failed",
                                   f"the swap to {model.name} failed: {failure[1]}",
                                   retry_after_s=max(1.0, gateway.swap_min_interval_s))
            decision = routing.decide(
                model, state.view, gateway, now=now,
                last_swap_request=state.last_swap_request, swap_requested=waiting,
            )
            if isinstance(decision, routing.Serve):
                state.last_used[model.name] = now
                return decision
            if isinstance(decision, routing.Refuse):
                raise GatewayError(503, decision.code, decision.message,
                                   retry_after_s=decision.retry_after_s)
            if isinstance(decision, routing.StartSwap):
                before = state.last_swap_request, state.last_swap_model
                state.last_swap_request, state.last_swap_model = now, model.name
                requested_at = now
                swap_requested = True
                m.swap_requests.labels(model.name).inc()
                event(log, "gateway_swap_on_demand", "%s", decision.reason,
                      SPARKD_MODEL=model.name)
                try:
                    await settings.daemon_call("swap", {"model": model.name})
                except (SparkdError, OSError) as exc:
                    # No swap started: nothing to wait for, and nothing to throttle.
                    state.last_swap_request, state.last_swap_model = before
                    raise GatewayError(503, "swap_failed",
                                       f"sparkd did not start a swap to {model.name}: "
                                       f"{getattr(exc, 'message', exc)}",
                                       retry_after_s=max(1.0, gateway.swap_min_interval_s)
                                       ) from None
                continue
            # Hold.
            if not held:
                if state.held >= gateway.queue_limit:
                    raise GatewayError(503, "queue_full",
                                       f"{decision.reason}, and {state.held} requests already"
                                       f" wait (gateway.queue_limit)",
                                       retry_after_s=max(1.0, gateway.hold_seconds))
                held = True
                state.held += 1
                m.held.inc()
            remaining = deadline - settings.clock()
            if remaining <= 0:
                raise GatewayError(503, "model_loading",
                                   f"{decision.reason}; not ready within"
                                   f" {gateway.hold_seconds:g} s (gateway.hold_seconds)",
                                   retry_after_s=max(1.0, gateway.hold_seconds / 4))
            changed = state.changed
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), remaining)
    finally:
        if held:
            state.held -= 1
            m.held.dec()
            m.hold_seconds.observe(settings.clock() - started)


def _variant(app: web.Application, model: ModelConfig, workload: str, serve: routing.Serve
             ) -> Variant:
    if len(serve.urls) == 1:
        return next(iter(serve.urls))
    settings = app[CONFIG].current
    return dispatch.choose(model.name, workload, tuple(serve.urls), model.speculative,
                           app[STATE].stats, draw=settings.draw()).variant


@functools.lru_cache(maxsize=1024)
def _url(base: str, query: str) -> yarl.URL:
    """Parsed once: yarl's parsing is a noticeable share of a proxied request."""
    return yarl.URL(base + ("?" + query if query else ""), encoded=False)


def _measured(model: str, app: web.Application) -> bool:
    spec = app[CONFIG].current.config.models[model].speculative
    return spec is not None and spec.dispatch == "measured"


async def _relay(
    request: web.Request,
    url: str,
    raw: bytes,
    extra_headers: Mapping[str, str],
    *,
    model: str,
    variant: Variant,
    workload: str,
    route: str,
    method: str = "POST",
) -> web.StreamResponse:
    """Forward one request and relay the answer: SSE chunk by chunk, anything else whole."""
    app = request.app
    session, m = app[SESSION], app[METRICS]
    names = FORWARDED_WITH_KEYS if app[door.DOOR].keys else FORWARDED
    headers = {k: v for k in names if (v := request.headers.get(k)) is not None}
    headers["Accept-Encoding"] = UPSTREAM_ACCEPT_ENCODING
    target = _url(url, request.query_string)
    loop = asyncio.get_running_loop()
    began = loop.time()
    status = 502
    try:
        try:
            # Never follow a redirect: it would re-send the body (and the client's headers)
            # wherever the engine, or whoever answers for it, points.
            async with session.request(method, target, data=raw or None, headers=headers,
                                       allow_redirects=False) as up:
                child(m.upstream_seconds, model, variant).observe(loop.time() - began)
                status = up.status
                if 300 <= up.status < 400:
                    status = 502
                    raise GatewayError(502, "upstream_redirect",
                                       f"the engine of {model} answered HTTP {up.status} (a"
                                       " redirect; the gateway does not follow redirects)")
                if up.status >= 400:
                    body = upstream_error_body(up.status, _decoded(up, await up.read()))
                    retry = {"Retry-After": up.headers["Retry-After"]} if (
                        "Retry-After" in up.headers) else {}
                    if up.status == 503 and not retry:
                        retry = {"Retry-After": "5"}
                    return web.json_response(body, status=up.status,
                                             headers={**extra_headers, **retry})
                content_type = up.headers.get("Content-Type", "application/json")
                if content_type.startswith("text/event-stream"):
                    return await _relay_stream(request, up, extra_headers, content_type,
                                               model=model, variant=variant, workload=workload)
                payload = await up.read()
                if _measured(model, app):
                    _record_rate(app, model, workload, variant, payload, loop.time() - began)
                return web.Response(body=payload, status=up.status,
                                    headers={**extra_headers, "Content-Type": content_type,
                                             **_encoding(up)})
        except TimeoutError:
            status = 504
            limit = app[CONFIG].current.config.gateway.upstream_timeout_s
            raise GatewayError(504, "upstream_timeout",
                               f"the engine of {model} did not answer within"
                               f" {limit:g} s") from None
        except aiohttp.ClientError as exc:
            status = 502
            raise GatewayError(502, "upstream_unreachable", routes.redact(
                f"the engine of {model} ({url}) failed: {exc}", url), retry_after_s=1
                               ) from None
    finally:
        child(m.requests, model, route, workload, variant, str(status)).inc()


async def _relay_stream(
    request: web.Request,
    up: aiohttp.ClientResponse,
    extra_headers: Mapping[str, str],
    content_type: str,
    *,
    model: str,
    variant: Variant,
    workload: str,
) -> web.StreamResponse:
    app = request.app
    response = web.StreamResponse(
        status=up.status,
        headers={**extra_headers, "Content-Type": content_type, "Cache-Control": "no-cache",
                 **_encoding(up)},
    )
    await response.prepare(request)
    measure = _measured(model, app)
    loop = asyncio.get_running_loop()
    first = last = 0.0
    events = 0
    try:
        async for chunk in up.content.iter_any():
            await response.write(chunk)
            if measure:
                now = loop.time()
                first = first or now
                last = now
                events += chunk.count(b"data:")
    except ConnectionResetError:  # writing to the client (aiohttp's is also a ClientError)
        log.debug("client went away during a stream from %s", model)
        return response  # leaving `async with` closes the upstream request
    except (aiohttp.ClientError, TimeoutError) as exc:
        # Headers are gone already: say it in the stream, as the engines do.
        err = error_body(502, "upstream_error", f"the engine's stream broke: {exc}")
        with contextlib.suppress(ConnectionError):
            await response.write(b"data: " + json.dumps(err).encode() + b"\n\n")
    if measure and events > 2 and last > first:
        _record(app, model, workload, variant, (events - 2) / (last - first))
    with contextlib.suppress(ConnectionError):
        await response.write_eof()
    return response


def _encoding(up: aiohttp.ClientResponse) -> dict[str, str]:
    """An engine that compressed its answer although asked not to: the client is told, and
    decodes it (the gateway passes bytes on, it does not decompress them)."""
    coding = up.headers.get("Content-Encoding")
    return {} if coding is None or coding.strip().lower() == "identity" else {
        "Content-Encoding": coding}


ERROR_BODY_LIMIT: Final = 64 * 1024


def _decoded(up: aiohttp.ClientResponse, raw: bytes) -> bytes:
    """An engine's error body, decompressed (its first ERROR_BODY_LIMIT bytes: no bomb) when
    it came gzip- or deflate-encoded: the gateway reads the message in it."""
    coding = up.headers.get("Content-Encoding", "").strip().lower()
    if coding not in ("gzip", "x-gzip", "deflate"):
        return raw
    try:
        # wbits 47: a gzip or zlib header, whichever it is; raw deflate as a fallback.
        return zlib.decompressobj(47).decompress(raw, ERROR_BODY_LIMIT)
    except zlib.error:
        with contextlib.suppress(zlib.error):
            return zlib.decompressobj(-15).decompress(raw, ERROR_BODY_LIMIT)
    return raw


def _record_rate(app: web.Application, model: str, workload: str, variant: Variant,
                 payload: bytes, elapsed: float) -> None:
    try:
        usage = json.loads(payload).get("usage") or {}
        tokens = float(usage.get("completion_tokens") or 0)
    except (ValueError, AttributeError, TypeError):
        return
    if tokens > 0 and elapsed > 0:
        _record(app, model, workload, variant, tokens / elapsed)


def _record(app: web.Application, model: str, workload: str, variant: Variant,
            rate: float) -> None:
    stats = app[STATE].stats
    stats.record(model, workload, variant, rate)
    app[METRICS].decode_rate.labels(model, workload, variant).set(
        stats.mean(model, workload, variant))


# --- other routes ----------------------------------------------------------------------------


async def passthrough(request: web.Request) -> web.StreamResponse:
    """Other /v1/* routes (embeddings, tokenize...): to the model the body names, else to the
    one loaded model."""
    settings = request.app[CONFIG].current
    raw = await door.read_body(request)
    name: str | None = None
    allow_remote = settings.config.gateway.allow_remote_images
    if len(raw) > INLINE_MAX_BYTES:  # parsed in the worker: parsing holds the loop
        name = await request.app[WORKER].model_name(raw, settings.recipe)
    elif raw:
        name = prepare.model_name(raw, allow_remote=allow_remote)
    if name is None:
        name = request.query.get("model")
    if isinstance(name, str):
        model = settings.config.models.get(name)
        if model is None:
            raise GatewayError(404, "model_not_found", f"The model `{name}` does not exist.",
                               param="model")
    else:
        loaded = [n for n, eps in request.app[STATE].view.endpoints.items()
                  if any(e.healthy for e in eps) and n in settings.config.models
                  and door.model_allowed(n)]
        if not loaded:
            raise GatewayError(503, "model_not_loaded",
                               "no model is loaded to serve this route", retry_after_s=5)
        model = settings.config.models[loaded[0]]
    door.check_model(request, model.name)
    serve = await _route(request.app, model)
    variant: Variant = "plain" if "plain" in serve.urls else next(iter(serve.urls))
    return await _relay(request, serve.urls[variant] + _match().path, raw, {},
                        model=model.name, variant=variant, workload="-", route="other",
                        method=request.method)


async def list_models(request: web.Request) -> web.Response:
    settings = request.app[CONFIG].current
    listing = routing.models_listing(settings.config, request.app[STATE].view,
                                     created=int(time.time()))
    if door.current().key is not None:  # a key limited to some models sees those
        listing["data"] = [m for m in listing["data"] if door.model_allowed(m["id"])]
    return web.json_response(listing)


async def health(request: web.Request) -> web.Response:
    state = request.app[STATE]
    view = state.view
    return web.json_response({
        "status": "ok",
        "daemon": {"connected": view.connected, "seen": view.seen,
                   "last_error": None if view.connected else state.last_link_error,
                   "swap": None if view.swap is None else {
                       "from": view.swap.from_model, "to": view.swap.to_model,
                       "step": view.swap.step}},
        "held_requests": state.held,
        "loaded": sorted(n for n, eps in view.endpoints.items() if any(e.healthy for e in eps)),
        "dispatch": state.stats.snapshot(),
    })


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[METRICS].registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


HANDLERS: Final[Mapping[routes.Kind, Handler]] = {
    "chat": chat_completions, "completions": completions, "models": list_models,
    "health": health, "metrics": metrics, "passthrough": passthrough,
}


# --- running it ------------------------------------------------------------------------------


GC_THRESHOLDS: Final = (20_000, 20, 20)


def tune_gc() -> None:
    """A proxy allocates a few hundred short-lived objects per request: with the default
    threshold (700) a young-generation collection runs every other request, a sixth of the
    gateway's CPU time. What start-up allocated (modules, config, the app) lives as long as
    the process: frozen out of the collector's sight, full collections stay short."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def apply_config(app: web.Application, config: Config, *, keys: auth.Keys | None = None
                 ) -> list[str]:
    """Put a new config in force without dropping a request (the gateway's SIGHUP). Returns
    what it cannot change in place (those need a restart of the gateway). `keys`: None reads
    them (gateway.keys_file); a bad keys file raises ConfigError before anything changes."""
    holder, state = app[CONFIG], app[STATE]
    old = holder.current
    if keys is None:
        keys = auth.check_keys(config)
    app[door.DOOR] = door.door_for(config.gateway, keys, previous=app[door.DOOR])
    g = config.gateway
    app[door.GUARD].configure(header_timeout_s=g.header_timeout_s,
                              idle_timeout_s=g.idle_timeout_s, body_timeout_s=g.body_timeout_s)
    holder.current = settings_for(config, daemon_call=old.daemon_call)
    state.update(state.view, routing.serving_table(config, state.view), now=old.clock())
    return [key for key, before, after in (
        ("gateway.listen", old.config.gateway.listen, config.gateway.listen),
        ("gateway.max_body_bytes", old.config.gateway.max_body_bytes,
         config.gateway.max_body_bytes),
        ("daemon.control_socket", old.config.daemon.control_socket,
         config.daemon.control_socket),
        ("gateway.max_connections", old.config.gateway.max_connections,
         config.gateway.max_connections),
    ) if before != after]


def make_runner(app: web.Application) -> web.AppRunner:
    gateway = app[CONFIG].current.config.gateway
    # handler_cancellation: a client that disconnects cancels its handler, and with it the
    # upstream request (aiohttp >= 3.9 leaves handlers running by default). keepalive and
    # lingering: an idle connection, or one whose body was refused, does not stay open.
    return web.AppRunner(app, access_log=None, handler_cancellation=True,
                         shutdown_timeout=stopping.SHUTDOWN_TIMEOUT_S,
                         keepalive_timeout=gateway.idle_timeout_s, lingering_time=1.0,
                         max_headers=100)


async def serve(config: Config, *, ready: Callable[[], None] = lambda: None,
                stop: asyncio.Event | None = None,
                on_app: Callable[[web.Application], None] = lambda app: None) -> None:
    """Listen on gateway.listen until `stop` is set."""
    host, _, port = config.gateway.listen.rpartition(":")
    keys = auth.check_keys(config)
    app = build_app(settings_for(config), keys=keys)
    on_app(app)
    runner = make_runner(app)
    await runner.setup()
    try:
        await door.GuardedSite(runner, host.strip("[]"), int(port), app[door.GUARD]).start()
        tune_gc()
        event(log, "gateway_listening", "gateway listening on %s", config.gateway.listen)
        ready()
        await (stop or asyncio.Event()).wait()
    finally:
        await stopping.drain(runner, app)
        await runner.cleanup()
