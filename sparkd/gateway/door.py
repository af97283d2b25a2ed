"""The gateway's door (aiohttp adapter): who is let in, and how long and how much a connection
may hold.

- `admit`: per request, after the route is matched (`routes`): the Host header (DNS
  rebinding), the browser's Origin, the API key and its rate limit (`auth`), and a JSON
  Content-Type on routes that take a body (a browser may POST `text/plain` cross-site without
  asking; it may not POST `application/json`). Everything is decided before the body is read,
  so a refused request costs no memory, and never swaps a model.
- `read_body`: the body within gateway.body_timeout_s and gateway.max_body_bytes, charged to
  one budget for every body in flight (gateway.body_memory_bytes): 20 clients each holding a
  30 MiB body no longer take 600 MiB.
- `ConnectionGuard` and `GuardedSite`: every connection is in one phase (idle, headers, body,
  work). Headers must arrive within gateway.header_timeout_s of their first byte, an idle
  connection is closed after gateway.idle_timeout_s, and at most `limit` connections are open
  (gateway.max_connections, and never more than the descriptor limit allows with headroom:
  `connection_limit`). At the limit, a new connection closes the oldest connection that is
  idle or still sending its request, not one being answered: slow or silent clients cannot
  lock out a client that sends its request and waits for the answer. Only when every
  connection is being answered is the new one told 503. What is closed is counted in
  metrics, and logged at most once a minute.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import enum
import ipaddress
import json
import logging
import resource
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Final, cast

from aiohttp import web

from sparkd.config import GatewayConfig
from sparkd.gateway import auth, routes
from sparkd.gateway.errors import GatewayError, error_body
from sparkd.journal import event

log = logging.getLogger(__name__)

RESERVED_FDS: Final = 64  # log, control socket, listening sockets, config and key files
LOG_EVERY_S: Final = 60.0


# --- per request -------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Pass:
    """What the door learned about the request being handled: its route, its key, and the
    body bytes it holds. aiohttp runs each request in a task of its own, so a ContextVar
    holds it for exactly that request (request storage would warn on aiohttp >= 3.13 for
    keys that are not RequestKeys, which aiohttp 3.9 lacks)."""

    match: routes.Match | None = None
    key: auth.KeyEntry | None = None
    charged: int = 0



@dataclass(slots=True)
class Door:
    """What the door decides with; replaced whole on a reload (rate buckets kept)."""

    keys: auth.Keys
    allowed_hosts: frozenset[str]
    max_body_bytes: int
    body_timeout_s: float
    body_memory_bytes: int
    limits: auth.RateLimits = field(default_factory=auth.RateLimits)
    in_flight: int = 0  # bytes of request bodies held now
    readers: dict[Pass, asyncio.Transport | None] = field(default_factory=dict)
    clock: Callable[[], float] = time.monotonic
    on_close: Callable[[str], None] = lambda reason: None

    def make_room(self, held: Pass, size: int) -> bool:
        """Room for `size` more bytes of `held`'s body: when the budget is full, the body
        still arriving that holds the most (more than `held`) is dropped, its connection
        closed: one client holding a large body cannot keep others out."""
        while self.in_flight + size > self.body_memory_bytes:
            hog = max(self.readers, key=lambda p: p.charged, default=None)
            if hog is None or hog is held or hog.charged <= held.charged + size:
                return False
            transport = self.readers.pop(hog)
            self.in_flight -= hog.charged
            hog.charged = 0
            if transport is not None:
                transport.abort()
            self.on_close("body_memory")
        return True


def door_for(gateway: GatewayConfig, keys: auth.Keys, *, previous: Door | None = None,
             on_close: Callable[[str], None] | None = None) -> Door:
    new = Door(keys=keys, allowed_hosts=frozenset(gateway.allowed_hosts),
               max_body_bytes=gateway.max_body_bytes, body_timeout_s=gateway.body_timeout_s,
               body_memory_bytes=gateway.body_memory_bytes)
    if previous is not None:  # a reload: what is in flight stays counted
        new.limits, new.in_flight, new.readers = (previous.limits, previous.in_flight,
                                                  previous.readers)
        new.on_close = previous.on_close
    if on_close is not None:
        new.on_close = on_close
    return new


DOOR: Final = web.AppKey("door", Door)


CURRENT: Final[contextvars.ContextVar[Pass]] = contextvars.ContextVar("sparkd_gateway_pass")


def current() -> Pass:
    """This request's pass (an empty one outside `front`, as in a test calling a handler)."""
    p = CURRENT.get(None)
    if p is None:
        p = Pass()
        CURRENT.set(p)
    return p


def _peer_is_loopback(request: web.Request) -> bool:
    peer = request.transport.get_extra_info("peername") if request.transport else None
    if not peer:
        return False
    try:
        return ipaddress.ip_address(peer[0]).is_loopback
    except ValueError:
        return False


def admit(request: web.Request, match: routes.Match) -> None:
    """Refuse (GatewayError) a request the door does not let in; remember its key."""
    door = request.app[DOOR]
    headers = request.headers
    host = headers.get("Host")
    if host is not None and not auth.host_allowed(host, door.allowed_hosts):
        raise GatewayError(421, "host_not_allowed",
                           "this gateway does not answer to that Host name (a DNS-rebinding"
                           " page would); add the name to gateway.allowed_hosts")
    origin = headers.get("Origin")
    if origin is not None and not auth.origin_allowed(origin, door.allowed_hosts):
        raise GatewayError(403, "origin_not_allowed",
                           "requests from web pages of other sites are refused (Origin);"
                           " a page under a name in gateway.allowed_hosts may")
    if door.keys and not (match.route.kind in ("health", "metrics")
                          and _peer_is_loopback(request)):
        presented = auth.presented_key(headers.get("Authorization"), headers.get("X-Api-Key"))
        entry = None if presented is None else door.keys.verify(presented)
        if entry is None:
            raise _Unauthorized("missing or unknown API key" if presented is None else
                                "unknown API key")
        current().key = entry
        wait = door.limits.wait(entry, door.clock())
        if wait > 0:
            raise GatewayError(429, "rate_limited",
                               f"key {entry.name!r}: over its rate_per_minute"
                               f" ({entry.rate_per_minute:g})", retry_after_s=max(1.0, wait))
    if match.route.json_body and request.body_exists:
        kind = request.content_type
        if kind != "application/json" and not kind.endswith("+json"):
            raise GatewayError(415, "unsupported_media_type",
                               f"Content-Type {kind!r}: send the body as application/json")


class _Unauthorized(GatewayError):
    def __init__(self, why: str) -> None:
        super().__init__(401, "invalid_api_key",
                         f"{why}: send Authorization: Bearer KEY (keys: sparkd gateway-key"
                         " add)")

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="sparkd"'}


def check_model(request: web.Request, model: str) -> None:
    """A key limited to some models may not use (or swap to) another."""
    entry = current().key
    if entry is not None and not entry.allows(model):
        raise GatewayError(403, "model_not_allowed",
                           f"key {entry.name!r} may not use model {model!r}", param="model")


def model_allowed(model: str) -> bool:
    entry = current().key
    return entry is None or entry.allows(model)


async def read_body(request: web.Request) -> bytes:
    """The whole body, within the size, time and memory bounds. The memory it holds stays
    charged until `release` (the end of the request)."""
    door = request.app[DOOR]
    guard = request.app.get(GUARD)
    limit = door.max_body_bytes
    length = request.content_length
    if length is not None and length > limit:
        raise _too_large(limit)
    chunks: list[bytes] = []
    got = 0
    held = current()
    door.readers[held] = request.transport
    try:
        async with asyncio.timeout(door.body_timeout_s):
            while True:
                chunk = await request.content.readany()
                if not chunk:
                    break
                got += len(chunk)
                if got > limit:
                    raise _too_large(limit)
                if not door.make_room(held, len(chunk)):
                    raise GatewayError(
                        503, "body_memory_full",
                        f"request bodies in flight hold {door.in_flight} bytes already"
                        " (gateway.body_memory_bytes)", retry_after_s=1)
                door.in_flight += len(chunk)
                held.charged += len(chunk)
                chunks.append(chunk)
    except TimeoutError:
        raise GatewayError(408, "body_timeout",
                           f"the request body did not arrive within {door.body_timeout_s:g} s"
                           " (gateway.body_timeout_s)") from None
    finally:
        door.readers.pop(held, None)
    if guard is not None:
        guard.working(request.transport)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def release(request: web.Request) -> None:
    held = current()
    if held.charged:
        request.app[DOOR].in_flight -= held.charged
        held.charged = 0


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, "body_too_large",
                        f"request body too large (limit {limit} bytes: gateway.max_body_bytes)")


# --- per connection ----------------------------------------------------------------------------


class Phase(enum.IntEnum):
    """idle --bytes--> headers --request--> body --read--> work --answered--> idle"""

    IDLE = 0
    HEADERS = 1
    BODY = 2
    WORK = 3


@dataclass(eq=False, slots=True)
class Conn:
    transport: asyncio.Transport
    phase: Phase
    since: float


def connection_limit(configured: int, nofile: int) -> int:
    """Connections the gateway keeps open at most: the configured limit, within what the
    descriptor limit allows. Each client connection may hold one to an engine as well (the
    upstream pool has the same limit), and RESERVED_FDS stay free for everything else."""
    return max(16, min(configured, (nofile - RESERVED_FDS) // 2))


def nofile_limit() -> int:
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    return soft if soft != resource.RLIM_INFINITY else 1 << 20


BUSY_REPLY: Final = (lambda body: (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
    b"Retry-After: 1\r\nConnection: close\r\nContent-Length: " + str(len(body)).encode()
    + b"\r\n\r\n" + body))(json.dumps(error_body(
        503, "connection_limit", "every connection is being answered (gateway.max_connections)"
    )).encode())


class ConnectionGuard:
    """Every open connection, its phase and since when; closes what overstays."""

    def __init__(self, *, limit: int, header_timeout_s: float, idle_timeout_s: float,
                 body_timeout_s: float, clock: Callable[[], float] = time.monotonic,
                 on_close: Callable[[str], None] = lambda reason: None) -> None:
        self.limit = limit
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.body_timeout_s = body_timeout_s
        self.clock = clock
        self.on_close = on_close
        self._conns: dict[asyncio.BaseTransport, Conn] = {}
        # Connections a newcomer may displace, oldest phase first (dict order).
        self._evictable: dict[Conn, None] = {}
        self._closed: dict[str, int] = {}
        self._logged_at = -LOG_EVERY_S

    def __len__(self) -> int:
        return len(self._conns)

    def configure(self, *, header_timeout_s: float, idle_timeout_s: float,
                  body_timeout_s: float) -> None:
        self.header_timeout_s = header_timeout_s
        self.idle_timeout_s = idle_timeout_s
        self.body_timeout_s = body_timeout_s

    def admit(self, transport: asyncio.Transport) -> Conn | None:
        """A new connection: its record, or None when it was refused (closed)."""
        if len(self._conns) >= self.limit:
            victim = next(iter(self._evictable), None)
            if victim is None:
                transport.write(BUSY_REPLY)
                transport.close()
                self._count("limit_refused")
                return None
            self._close(victim, "limit_evicted")
        conn = Conn(transport, Phase.IDLE, self.clock())
        self._conns[transport] = conn
        self._evictable[conn] = None
        return conn

    def _enter(self, conn: Conn, phase: Phase) -> None:
        conn.phase = phase
        conn.since = self.clock()
        self._evictable.pop(conn, None)
        if phase != Phase.WORK:
            self._evictable[conn] = None

    def data(self, conn: Conn) -> None:
        if conn.phase == Phase.IDLE:
            self._enter(conn, Phase.HEADERS)

    def request_started(self, transport: asyncio.BaseTransport | None, *, body: bool) -> None:
        conn = self._conns.get(transport) if transport is not None else None
        if conn is not None:
            self._enter(conn, Phase.BODY if body else Phase.WORK)

    def working(self, transport: asyncio.BaseTransport | None) -> None:
        conn = self._conns.get(transport) if transport is not None else None
        if conn is not None and conn.phase != Phase.WORK:
            self._enter(conn, Phase.WORK)

    def request_done(self, transport: asyncio.BaseTransport | None) -> None:
        conn = self._conns.get(transport) if transport is not None else None
        if conn is not None:
            self._enter(conn, Phase.IDLE)

    def lost(self, conn: Conn) -> None:
        self._conns.pop(conn.transport, None)
        self._evictable.pop(conn, None)

    def _close(self, conn: Conn, reason: str) -> None:
        self.lost(conn)
        conn.transport.abort()
        self._count(reason)

    def _count(self, reason: str) -> None:
        self._closed[reason] = self._closed.get(reason, 0) + 1
        self.on_close(reason)
        now = self.clock()
        if reason.startswith("limit") and now - self._logged_at >= LOG_EVERY_S:
            self._logged_at = now
            event(log, "gateway_connection_limit",
                  "connection limit %d reached: closing the oldest idle or slow connections"
                  " (gateway.max_connections, LimitNOFILE); closed so far: %s", self.limit,
                  ", ".join(f"{k} {v}" for k, v in sorted(self._closed.items())),
                  level=logging.WARNING)

    def sweep(self) -> None:
        """Close what overstays its phase."""
        now = self.clock()
        for conn in list(self._evictable):
            age = now - conn.since
            if conn.phase == Phase.HEADERS and age > self.header_timeout_s:
                self._close(conn, "header_timeout")
            elif conn.phase == Phase.IDLE and age > self.idle_timeout_s:
                self._close(conn, "idle_timeout")
            elif conn.phase == Phase.BODY and age > self.body_timeout_s + 5:
                # read_body's own timeout answers 408 first; this is for a handler that
                # never reads.
                self._close(conn, "body_timeout")

    async def run(self) -> None:
        """Sweep until cancelled."""
        while True:
            await asyncio.sleep(min(1.0, self.header_timeout_s / 4))
            self.sweep()


GUARD: Final = web.AppKey("guard", ConnectionGuard)


async def sweeper(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the guard's sweeps for as long as the app runs."""
    task = asyncio.create_task(app[GUARD].run(), name="gateway-connection-sweeper")
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


class GuardedProtocol(asyncio.Protocol):
    """aiohttp's request handler with the guard told of each connection and its bytes."""

    __slots__ = ("_conn", "_guard", "_inner")

    def __init__(self, inner: asyncio.Protocol, guard: ConnectionGuard) -> None:
        self._inner = inner
        self._guard = guard
        self._conn: Conn | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they have its methods.
        self._conn = self._guard.admit(cast(asyncio.Transport, transport))
        if self._conn is not None:
            self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        conn = self._conn
        if conn is not None:
            if conn.phase == Phase.IDLE:
                self._guard.data(conn)
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._conn is not None else None

    def connection_lost(self, exc: Exception | None) -> None:
        conn = self._conn
        if conn is not None:
            self._guard.lost(conn)
            self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        if self._conn is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._conn is not None:
            self._inner.resume_writing()


class GuardedSite(web.BaseSite):
    """A TCP site whose connections the guard watches (aiohttp's TCPSite, wrapped)."""

    __slots__ = ("_guard", "_host", "_port")

    def __init__(self, runner: web.BaseRunner, host: str, port: int, guard: ConnectionGuard,
                 *, backlog: int = 1024) -> None:
        super().__init__(runner, backlog=backlog)
        self._host = host
        self._port = port
        self._guard = guard

    @property
    def name(self) -> str:
        return f"http://{self._host}:{self._port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        assert server is not None
        guard = self._guard

        def factory() -> asyncio.Protocol:
            return GuardedProtocol(server(), guard)

        self._server = await asyncio.get_running_loop().create_server(
            factory, self._host, self._port, backlog=self._backlog, reuse_address=True)
