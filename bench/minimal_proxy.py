"""The minimal aiohttp pass-through proxy issue 5 compares the gateway with: the ceiling for a
Python proxy on the same machine. It forwards the body as is and relays the answer (SSE chunk
by chunk); no parsing, no routing, no metrics.

    python bench/minimal_proxy.py PORT UPSTREAM_URL
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator

import aiohttp
from aiohttp import web

SESSION = web.AppKey("session", aiohttp.ClientSession)
UPSTREAM = web.AppKey("upstream", str)


async def handle(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    upstream = request.app[UPSTREAM]
    async with request.app[SESSION].post(
        upstream + request.path, data=body, headers={"Content-Type": "application/json"}
    ) as up:
        content_type = up.headers.get("Content-Type", "application/json")
        if content_type.startswith("text/event-stream"):
            resp = web.StreamResponse(status=up.status, headers={"Content-Type": content_type})
            await resp.prepare(request)
            async for chunk in up.content.iter_any():
                await resp.write(chunk)
            await resp.write_eof()
            return resp
        return web.Response(body=await up.read(), status=up.status,
                            headers={"Content-Type": content_type})


async def session(app: web.Application) -> AsyncIterator[None]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as s:
        app[SESSION] = s
        yield


def main() -> None:
    port, upstream = int(sys.argv[1]), sys.argv[2]
    app = web.Application()
    app[UPSTREAM] = upstream
    app.cleanup_ctx.append(session)
    app.router.add_post("/{tail:.*}", handle)
    # The same event loop (uvloop) and garbage-collector tuning as the gateway, so that the
    # comparison is of the code.
    import gc

    import uvloop

    gc.collect()
    gc.freeze()
    gc.set_threshold(20_000, 20, 20)

    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None,
                loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
