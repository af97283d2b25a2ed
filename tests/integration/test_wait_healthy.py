"""`sparkd wait-healthy` and `probe()` against real aiohttp servers on loopback port 0."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from aiohttp import web

from sparkd.engine.health import probe

Answer = Callable[[int], int]  # the n-th request (from 0) -> the status to answer


class ThreadedServer:
    """An aiohttp app on 127.0.0.1:0, served by its own event loop on a thread, so that a
    subprocess and synchronous test code can talk to it."""

    def __init__(self, answer: Answer, *, hang: bool = False) -> None:
        self.answer = answer
        self.hang = hang
        self.hits = 0
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-server")
        self.release = asyncio.Event()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def _health(self, _request: web.Request) -> web.Response:
        n, self.hits = self.hits, self.hits + 1
        if self.hang:
            await self.release.wait()
        return web.Response(status=self.answer(n), text="ok\n")

    async def _start(self) -> str:
        app = web.Application()
        app.router.add_get("/health", self._health)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        host, port = self.runner.addresses[0][:2]
        return f"http://{host}:{port}/health"

    async def _stop(self) -> None:
        self.release.set()
        if self.runner is not None:
            await self.runner.cleanup()

    def start(self) -> None:
        self.thread.start()
        self.url = asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture
def serve() -> Iterator[Callable[..., ThreadedServer]]:
    servers: list[ThreadedServer] = []

    def start(answer: Answer, *, hang: bool = False) -> ThreadedServer:
        server = ThreadedServer(answer, hang=hang)
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()


Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def wait_healthy_cli(sparkd_cli: Run) -> Run:
    """`sparkd wait-healthy ARGS...` as a child process."""
    return lambda *args, timeout=30: sparkd_cli("wait-healthy", *args, timeout=timeout)


def test_503_then_200_exits_0(
    serve: Callable[..., ThreadedServer], wait_healthy_cli: Run
) -> None:
    server = serve(lambda n: 503 if n < 3 else 200)
    url = server.url
    result = wait_healthy_cli("--url", url, "--timeout", "20", "--interval", "0.1")
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(
        rf"wait-healthy: {re.escape(url)}: healthy \(HTTP 200\) after \d+\.\d s, 4 probes\n",
        result.stderr,
    ), result.stderr
    assert server.hits == 4


def test_always_503_times_out_with_exit_1(
    serve: Callable[..., ThreadedServer], wait_healthy_cli: Run
) -> None:
    server = serve(lambda _n: 503)
    url = server.url
    start = time.monotonic()
    result = wait_healthy_cli("--url", url, "--timeout", "1", "--interval", "0.2")
    assert result.returncode == 1
    assert time.monotonic() - start < 10
    assert re.fullmatch(
        rf"wait-healthy: {re.escape(url)}: not healthy after 1\.\d s \(\d+ probes, timeout 1 s\): "
        r"last HTTP 503\n",
        result.stderr,
    ), result.stderr
    assert server.hits >= 5


def test_engine_that_exited_ends_the_wait_at_once(
    serve: Callable[..., ThreadedServer], wait_healthy_cli: Run
) -> None:
    server = serve(lambda _n: 503)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    start = time.monotonic()
    result = wait_healthy_cli("--url", server.url, "--timeout", "30", "--interval", "0.2",
                              "--pid", str(dead.pid))
    assert result.returncode == 1
    assert time.monotonic() - start < 10
    assert f"the engine (pid {dead.pid}) exited before it became healthy" in result.stderr


def test_live_engine_keeps_the_wait_going(
    serve: Callable[..., ThreadedServer], wait_healthy_cli: Run
) -> None:
    server = serve(lambda n: 503 if n < 3 else 200)
    result = wait_healthy_cli("--url", server.url, "--timeout", "10", "--interval", "0.1",
                              "--pid", str(os.getpid()))
    assert result.returncode == 0, result.stderr


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_nothing_listening_names_the_error(wait_healthy_cli: Run) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/health"
    result = wait_healthy_cli("--url", url, "--timeout", "0.5", "--interval", "0.1")
    assert result.returncode == 1
    assert result.stderr.endswith(": last cannot connect: connection refused\n"), result.stderr
    assert url in result.stderr


def test_bad_url_is_a_usage_error(wait_healthy_cli: Run) -> None:
    result = wait_healthy_cli("--url", "localhost:8000/health", "--timeout", "1")
    assert result.returncode == 2
    assert "expected an http:// or https:// URL" in result.stderr


# --- probe() ----------------------------------------------------------------------------------


def test_probe_statuses(serve: Callable[..., ThreadedServer]) -> None:
    server = serve(lambda n: (200, 503)[n % 2])
    url = server.url

    async def both() -> tuple[bool, int | None, bool, int | None]:
        ok = await probe(url, timeout_s=5)
        loading = await probe(url, timeout_s=5)
        return ok.ok, ok.status, loading.ok, loading.status

    assert asyncio.run(both()) == (True, 200, False, 503)


def test_probe_timeout_is_an_error_not_an_exception(serve: Callable[..., ThreadedServer]) -> None:
    server = serve(lambda _n: 200, hang=True)
    result = asyncio.run(probe(server.url, timeout_s=0.2))
    assert (result.ok, result.status) == (False, None)
    assert result.error == "no answer within 0.2 s"
    assert 0.15 < result.latency_s < 5
    assert result.describe() == "no answer within 0.2 s"


def test_probe_refused() -> None:
    result = asyncio.run(probe(f"http://127.0.0.1:{_closed_port()}/health", timeout_s=2))
    assert result.error == "cannot connect: connection refused"
    assert result.latency_ms == result.latency_s * 1000
