"""The real `sparkd gateway` process under a lowered descriptor limit, against hostile
connections (issue 10 item 5): partial headers sent slowly (slowloris), silent connections,
bodies held open, endless chunked bodies. Each is closed after its timeout, the gateway keeps
within its descriptors and its memory, logs no storm, and a well-behaved client is served
throughout.

The gateway runs with RLIMIT_NOFILE = 256: the connection guard keeps (256 - 64) / 2 = 96
connections at most, one engine connection each beside them."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from conftest import SimEngine, SimEngines, free_port

NOFILE = 256
LIMIT = (NOFILE - 64) // 2
POST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b"Content-Type: application/json\r\n")
CHAT = json.dumps({"model": "ext", "messages": [{"role": "user", "content": "hi"}]}).encode()


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    log: Path

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise AssertionError("no VmRSS")

    def fds(self) -> int:
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def alive(self) -> bool:
        return self.proc.poll() is None


@pytest.fixture(scope="module")
def engine(module_sim_engines: SimEngines) -> SimEngine:
    e = module_sim_engines.start("--load-seconds", "0", model="ext")
    e.wait_health(200)
    return e


@pytest.fixture
def gateway(engine: SimEngine, tmp_path: Path) -> Iterator[GatewayProcess]:
    port = free_port()
    config = tmp_path / "sparkd.toml"
    config.write_text(f"""
[daemon]
control_socket = "{tmp_path / 'control.sock'}"
[gateway]
listen = "127.0.0.1:{port}"
header_timeout_s = 1
idle_timeout_s = 2
body_timeout_s = 2
body_memory_bytes = 67108864
[models.ext]
engine = "external"
url = "{engine.base_url}"
""")
    log = tmp_path / "gateway.log"
    code = (f"import resource; resource.setrlimit(resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE}));"
            " from sparkd.main import main; main()")
    with log.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-c", code, "gateway", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    gw = GatewayProcess(proc, port, log)
    try:
        deadline = time.monotonic() + 20
        while asyncio.run(_chat(port, timeout=2)) != 200:
            assert gw.alive(), log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        yield gw
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def _chat(port: int, *, timeout: float = 5) -> int:
    """One well-behaved chat completion on a new connection: its status (0: no answer)."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            try:
                writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                             b"Content-Type: application/json\r\nConnection: close\r\n"
                             b"Content-Length: %d\r\n\r\n" % len(CHAT) + CHAT)
                status = await reader.readline()
                await reader.read()
                return int(status.split()[1]) if status else 0
            finally:
                writer.close()
                with contextlib.suppress(OSError):
                    await writer.wait_closed()
    except (OSError, TimeoutError, ValueError, IndexError):
        return 0


async def _closed_by_server(reader: asyncio.StreamReader, timeout: float) -> bool:
    """Whether the server closes the connection within `timeout` (what it answers first is
    read and dropped)."""
    try:
        async with asyncio.timeout(timeout):
            while await reader.read(65536):
                pass
        return True
    except (ConnectionError, OSError):
        return True
    except TimeoutError:
        return False


async def _open(port: int, first: bytes = b"") -> tuple[asyncio.StreamReader,
                                                         asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if first:
        writer.write(first)
    return reader, writer


def _close_all(writers: list[asyncio.StreamWriter]) -> None:
    for w in writers:
        w.transport.abort()


def test_slowloris_and_silent_connections_are_closed_and_a_client_is_served(
    gateway: GatewayProcess,
) -> None:
    async def attack() -> tuple[list[int], list[bool], int]:
        conns = []
        for i in range(3 * LIMIT):  # three times what the gateway keeps open
            first = b"" if i % 2 else b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            with contextlib.suppress(OSError):
                conns.append(await _open(gateway.port, first))
        stop = asyncio.Event()

        async def trickle() -> None:  # a header byte now and then on every slowloris
            while not stop.is_set():
                for i, (_, w) in enumerate(conns):
                    if i % 2 == 0 and not w.is_closing():
                        with contextlib.suppress(OSError):
                            w.write(b"X")
                await asyncio.sleep(0.2)

        task = asyncio.create_task(trickle())
        try:
            statuses = [await _chat(gateway.port) for _ in range(20)]
            fds = gateway.fds()
            closed = await asyncio.gather(*(_closed_by_server(r, 4.0) for r, _ in conns))
        finally:
            stop.set()
            await task
            _close_all([w for _, w in conns])
        return statuses, list(closed), fds

    statuses, closed, fds = asyncio.run(attack())
    assert statuses == [200] * 20
    assert all(closed), f"{closed.count(False)} hostile connections still open"
    assert fds <= NOFILE - 16
    assert gateway.alive()
    assert asyncio.run(_chat(gateway.port)) == 200
    log = gateway.log.read_text()
    assert len(log) < 4096 and "Too many open files" not in log, log[-2000:]
    metrics = asyncio.run(_get(gateway.port, "/metrics"))
    assert 'sparkd_gateway_connections_closed_total{reason="header_timeout"}' in metrics
    assert 'sparkd_gateway_connections_closed_total{reason="limit_evicted"}' in metrics


async def _get(port: int, path: str) -> str:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    return data.decode(errors="replace")


def test_held_bodies_stay_within_the_memory_budget_and_a_client_is_served(
    gateway: GatewayProcess,
) -> None:
    size = 30 * 1024 * 1024
    before = gateway.rss_mib()

    async def hold() -> tuple[float, list[int], list[bool]]:
        conns = []
        chunk = b"x" * (1024 * 1024)
        for _ in range(20):
            r, w = await _open(gateway.port, POST + b"Content-Length: %d\r\n\r\n" % size)
            conns.append((r, w))
        for _ in range(size // len(chunk) - 1):  # all but the last MiB, then hold
            for _, w in conns:
                if not w.is_closing():
                    w.write(chunk)
            for _, w in conns:
                with contextlib.suppress(OSError):
                    await w.drain()
        await asyncio.sleep(0.3)
        peak = gateway.rss_mib()
        statuses = [await _chat(gateway.port) for _ in range(5)]
        closed = await asyncio.gather(*(_closed_by_server(r, 5.0) for r, _ in conns))
        _close_all([w for _, w in conns])
        return peak, statuses, list(closed)

    peak, statuses, closed = asyncio.run(hold())
    print(f"RSS {before:.0f} MiB before, {peak:.0f} MiB holding 20 x 30 MiB bodies")
    # The budget is 64 MiB of bodies; 20 x 30 MiB held took 765 MiB before it.
    assert peak - before < 64 + 48, (before, peak)
    assert statuses == [200] * 5
    assert all(closed)
    assert gateway.alive() and asyncio.run(_chat(gateway.port)) == 200


def test_endless_chunked_bodies_end_with_413_or_408(gateway: GatewayProcess) -> None:
    async def endless(delay: float) -> bytes:
        r, w = await _open(gateway.port, POST + b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"%x\r\n%s\r\n" % (65536, b"x" * 65536) if not delay else b"1\r\nx\r\n"
        received = bytearray()

        async def collect() -> None:  # what the gateway answers, read as it comes
            with contextlib.suppress(ConnectionError, OSError):
                while data := await r.read(65536):
                    received.extend(data)

        reading = asyncio.create_task(collect())
        try:
            async with asyncio.timeout(15):
                for _ in range(2000 if not delay else 200):  # bounded: 128 MiB, or 200 bytes
                    if reading.done():
                        break
                    w.write(piece)
                    await w.drain()
                    if delay:
                        await asyncio.sleep(delay)
                await reading
        except (ConnectionError, OSError):
            await reading
        finally:
            w.transport.abort()
            reading.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reading
        return bytes(received)

    fast = asyncio.run(endless(0))
    assert fast.startswith(b"HTTP/1.1 413") and b"body_too_large" in fast, fast[:300]
    slow = asyncio.run(endless(0.05))
    assert slow.startswith(b"HTTP/1.1 408") and b"body_timeout" in slow, slow[:300]
    assert gateway.alive() and asyncio.run(_chat(gateway.port)) == 200


def test_an_idle_keep_alive_connection_is_closed(gateway: GatewayProcess) -> None:
    async def idle() -> tuple[bytes, bool]:
        r, w = await _open(gateway.port, POST + b"Content-Length: %d\r\n\r\n" % len(CHAT) + CHAT)
        status = await r.readline()
        t = time.monotonic()
        closed = await _closed_by_server(r, 6.0)
        w.transport.abort()
        return status, closed and 1.5 < time.monotonic() - t < 5.5

    status, closed = asyncio.run(idle())
    assert status.startswith(b"HTTP/1.1 200") and closed
