"""sparkd's scrape of an engine's /metrics (liveness beyond /health) against a real aiohttp
server on loopback: a body that arrives in several pieces is read whole, one over the limit
or a non-200 is no answer."""

from __future__ import annotations

import asyncio

import aiohttp
from aiohttp import web

from sparkd.daemon.application import METRICS_MAX_BYTES, scrape_metrics

# A large exposition: histograms first, the token counter last (~1.1 MB).
BODY = ("".join(f'vllm:e2e_request_latency_seconds_bucket{{le="{i}"}} {i}\n'
                for i in range(20000)) + "vllm:generation_tokens_total 12345\n").encode()


async def served(body: bytes, status: int = 200, piece: int = 16384) -> tuple[
        web.AppRunner, str]:
    async def metrics(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(status=status)
        await response.prepare(request)
        for at in range(0, len(body), piece):  # in pieces, as a busy server's writes arrive
            await response.write(body[at:at + piece])
            await asyncio.sleep(0.001)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    server = site._server
    assert isinstance(server, asyncio.base_events.Server)
    port = server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}/metrics"


def scrape(body: bytes, **kw: int) -> str | None:
    async def scenario() -> str | None:
        runner, url = await served(body, **kw)
        try:
            async with aiohttp.ClientSession() as session:
                return await scrape_metrics(session, url)
        finally:
            await runner.cleanup()

    return asyncio.run(scenario())


def test_a_body_in_many_pieces_is_read_whole() -> None:
    # response.content.read(n) returns what has arrived, up to n: the first 16 KiB of a
    # 0.9 MB exposition was read as all of it, and the token counter at its end was missing
    # (liveness then read "unknown" and never struck).
    text = scrape(BODY)
    assert text is not None
    assert len(text) == len(BODY)
    assert text.endswith("vllm:generation_tokens_total 12345\n")


def test_over_the_limit_or_not_200_is_no_answer() -> None:
    assert scrape(b"x" * (METRICS_MAX_BYTES + 1), piece=1 << 20) is None
    assert scrape(b"x" * METRICS_MAX_BYTES, piece=1 << 20) == "x" * METRICS_MAX_BYTES
    assert scrape(b"oops", status=503) is None
