"""The gateway in a thread of its own, in front of real simulated engines (test doubles), with a
fake daemon on a real control socket whose status the test drives (swap in progress, loading,
healthy), as the daemon's subscribe stream would. What the fake daemon says is built with the
schema's constructors (sparkd.control.status, tests/status_builders.py): the shapes the real
daemon sends. A test of what the real daemon says drives the real Supervisor instead
(test_gateway_contract.py).

Everything runs on one event loop in one thread, started and stopped by the fixture, so the
synchronous `openai` client can be used from the test, and nothing outlives the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http.client
import json
import shutil
import socket
import tempfile
import threading
import urllib.parse
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import status_builders as sb
from aiohttp import web

from sparkd.config import Config, parse_config
from sparkd.control.protocol import Request
from sparkd.control.server import ControlServer
from sparkd.control.status import (
    SWAP_EVENTS,
    EngineRecord,
    Event,
    EventName,
    Status,
    SwapRecord,
    SwapReply,
    VariantName,
)
from sparkd.daemon.events import as_json
from sparkd.daemon.supervisor import Supervisor
from sparkd.errors import BadRequest
from sparkd.gateway import door
from sparkd.gateway import stopping as gateway_stopping
from sparkd.gateway.app import build_app, make_runner, settings_for

T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def engine_entry(model: str, port: int, *, active_state: str = "active", healthy: bool = True,
                 variant: VariantName = "plain") -> EngineRecord:
    return sb.engine(model, port, active_state=active_state, healthy=healthy, variant=variant)


class FakeDaemon:
    """The daemon's control socket: `status`, `subscribe`, and the swap author's `swap` and
    `unload` (recorded; the test decides what the status says next)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.status: Status = sb.status()
        self.calls: list[tuple[str, dict[str, Any]]] = []
        self.refuse: dict[str, str] = {}  # method -> error message
        self._queues: set[asyncio.Queue[Event | None]] = set()
        self.server = ControlServer(path, group="sparkd-test-none", handler=self._handle,
                                    streams={"subscribe": self._subscribe})

    async def _handle(self, request: Request) -> Any:
        self.calls.append((request.method, dict(request.params)))
        if request.method in self.refuse:
            raise BadRequest(self.refuse[request.method])
        if request.method == "status":
            return self.status.to_json()
        if request.method == "swap":  # what the daemon answers when it starts a swap
            model = request.params["model"]
            return SwapReply(accepted=True, noop=False, swap=sb.swap(
                model, from_model=self.status.active_model, step="preflight")).to_json()
        if request.method == "unload":
            return {"model": request.params["model"], "stopped": True}
        raise BadRequest(f"unknown method {request.method!r}")

    async def _subscribe(self, _request: Request) -> AsyncIterator[Any]:
        queue: asyncio.Queue[Event | None] = asyncio.Queue()
        self._queues.add(queue)
        try:
            yield Event(event="snapshot", status=self.status).to_json()
            while True:
                message = await queue.get()
                if message is None:
                    return
                yield message.to_json()
        finally:
            self._queues.discard(queue)

    def publish(self, name: EventName = "changed", *, swap: SwapRecord | None = None) -> None:
        message = Event(event=name, status=self.status, swap=swap)
        for queue in list(self._queues):
            queue.put_nowait(message)

    def drop_subscribers(self) -> None:
        for queue in list(self._queues):
            queue.put_nowait(None)

    @property
    def subscribers(self) -> int:
        return len(self._queues)


class SupervisorDaemon(FakeDaemon):
    """The real Supervisor (over the fake systemd of tests/fakes.py) behind the control
    socket: its replies and its event stream are the daemon's own."""

    def __init__(self, path: Path, supervisor: Supervisor) -> None:
        super().__init__(path)
        self.supervisor = supervisor

    async def _handle(self, request: Request) -> Any:
        self.calls.append((request.method, dict(request.params)))
        return await self.supervisor.handle(request)

    async def _subscribe(self, _request: Request) -> AsyncIterator[Any]:
        async for message in as_json(self.supervisor.subscribe()):
            yield message

    def drop_subscribers(self) -> None:
        self.supervisor.events.close()


class Gateway:
    def __init__(self, config: Config, daemon: FakeDaemon, loop: asyncio.AbstractEventLoop,
                 port: int, app: web.Application) -> None:
        self.config = config
        self.daemon = daemon
        self.loop = loop
        self.port = port
        self.app = app

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def run(self, fn: Callable[[], Coroutine[Any, Any, T]], timeout: float = 10) -> T:
        """Run a coroutine on the gateway's loop (to drive the fake daemon)."""
        return asyncio.run_coroutine_threadsafe(fn(), self.loop).result(timeout)

    def set_status(self, *, engines: list[EngineRecord], active_model: str | None = None,
                   swap: SwapRecord | None = None, event: EventName = "changed",
                   ended: SwapRecord | None = None) -> None:
        """A new status, published as `event`. As the daemon's, a swap_step carries the swap
        in progress (`swap`), and swap_done or swap_failed the swap that `ended`."""
        async def go() -> None:
            self.daemon.status = sb.status(engines=engines, active_model=active_model,
                                           swap=swap)
            self.daemon.publish(event, swap=ended or (swap if event in SWAP_EVENTS else None))

        self.run(go)


@contextlib.contextmanager
def running_gateway(config_text: str, *, initial: Status | None = None,
                    supervisor: Supervisor | None = None,
                    start_daemon: bool = True, clock: Callable[[], float] | None = None,
                    draw: Callable[[], float] | None = None) -> Iterator[Gateway]:
    """The gateway on a free port, its config being `config_text` with the fake daemon's
    socket and the port filled in ({socket}, {listen} placeholders are added if absent)."""
    workdir = Path(tempfile.mkdtemp(prefix="sgw", dir="/tmp"))  # short: a socket path
    sock = workdir / "control.sock"
    port = free_port()
    text = f'[daemon]\ncontrol_socket = "{sock}"\n' + config_text.replace(
        "{listen}", f"127.0.0.1:{port}")
    config = parse_config(text, source=workdir / "sparkd.toml")
    loop = asyncio.new_event_loop()
    daemon = FakeDaemon(sock) if supervisor is None else SupervisorDaemon(sock, supervisor)
    if initial is not None:
        daemon.status = initial
    settings = settings_for(config)
    if clock is not None:
        settings = dataclasses.replace(settings, clock=clock)
    if draw is not None:
        settings = dataclasses.replace(settings, draw=draw)
    app = build_app(settings)
    # The production runner: a stop here is the gateway's stop (grace, then cancellation).
    runner = make_runner(app)
    started = threading.Event()
    stopping: asyncio.Event | None = None

    async def main() -> None:
        nonlocal stopping
        stopping = asyncio.Event()
        if start_daemon:
            await daemon.server.start()
        await runner.setup()
        # The production site: the connection guard watches every connection.
        await door.GuardedSite(runner, "127.0.0.1", port, app[door.GUARD]).start()
        started.set()
        await stopping.wait()
        await gateway_stopping.drain(runner, app)  # as the gateway's serve() stops
        await runner.cleanup()
        daemon.drop_subscribers()
        await daemon.server.close()
        # The server's connection handlers end once their streams do: wait for them.
        others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        await asyncio.wait_for(asyncio.gather(*others, return_exceptions=True), 5)

    thread = threading.Thread(target=loop.run_until_complete, args=(main(),),
                              name="gateway-under-test")
    thread.start()
    try:
        if not started.wait(10):
            raise AssertionError("the gateway did not start")
        yield Gateway(config, daemon, loop, port, app)
    finally:
        if stopping is not None:
            loop.call_soon_threadsafe(stopping.set)
        thread.join(15)
        loop.close()
        shutil.rmtree(workdir, ignore_errors=True)


class Reply:
    def __init__(self, status: int, headers: dict[str, str], raw: bytes) -> None:
        self.status_code = status
        self.headers = headers
        self.content = raw

    @property
    def text(self) -> str:
        return self.content.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.content)


def http_request(method: str, url: str, *, content: bytes | None = None, json_body: Any = None,
         headers: dict[str, str] | None = None, timeout: float = 30) -> Reply:
    """One plain HTTP request (http.client: no extra dependency)."""
    parts = urllib.parse.urlsplit(url)
    if parts.hostname is None:
        raise ValueError(f"no host in {url!r}")
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    hdrs = dict(headers or {})
    if json_body is not None:
        content = json.dumps(json_body).encode()
        hdrs.setdefault("Content-Type", "application/json")
    try:
        conn.request(method, parts.path + (f"?{parts.query}" if parts.query else ""),
                     body=content, headers=hdrs)
        response = conn.getresponse()
        raw = response.read()
        return Reply(response.status, {k: v for k, v in response.getheaders()}, raw)
    finally:
        conn.close()


def get(url: str, **kw: Any) -> Reply:
    return http_request("GET", url, **kw)


def post(url: str, **kw: Any) -> Reply:
    return http_request("POST", url, **kw)
