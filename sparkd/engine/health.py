"""Engine readiness over HTTP: `probe()` for the daemon, `sparkd wait-healthy` for units.

vLLM, SGLang and llama.cpp all serve `GET /health`; llama.cpp answers 503 while loading and the
others do not listen until they are ready, so "healthy" is exactly HTTP 200 and anything else
(another status, refused connection, timeout) is "not yet".

`sparkd wait-healthy --url URL --timeout S` is the engine unit's `ExecStartPost=`: vLLM sends no
READY=1, so the unit stays `activating` until this exits 0, and `systemctl start` then means
"serving" (FACTS.md, systemd). It writes one line to stderr (the journal) either way.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Final

import aiohttp
import click

from sparkd.engine.probe import ProbeResult

PROBE_TIMEOUT_S: Final = 5.0  # one probe; a loaded engine answers /health in milliseconds
MIN_PROBE_TIMEOUT_S: Final = 0.1  # the last probe before the deadline still gets this long
# A probe is one loopback HTTP request; polling often makes `active` follow readiness closely.
DEFAULT_INTERVAL_S: Final = 0.05

EXIT_UNHEALTHY: Final = 1


async def probe(
    url: str, *, timeout_s: float, session: aiohttp.ClientSession | None = None
) -> ProbeResult:
    """GET `url` once. Never raises for network trouble: the error is in the result.

    Pass a long-lived `session` from the daemon (one per probe loop) to reuse connections;
    without one, a session is opened and closed for this probe. Redirects are not followed:
    a health endpoint that redirects is not healthy.
    """
    if session is None:
        async with aiohttp.ClientSession() as own:
            return await probe(url, timeout_s=timeout_s, session=own)
    start = time.monotonic()
    status: int | None = None
    error: str | None = None
    try:
        async with session.get(
            url, timeout=aiohttp.ClientTimeout(total=timeout_s), allow_redirects=False
        ) as response:
            status = response.status
    except TimeoutError:
        error = f"no answer within {timeout_s:g} s"
    except aiohttp.ClientConnectorError as exc:
        error = f"cannot connect: {_os_error_text(exc.os_error)}"
    except aiohttp.ClientError as exc:
        error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    return ProbeResult(url=url, status=status, error=error, latency_s=time.monotonic() - start)


async def models_listed(session: aiohttp.ClientSession, url: str, model: str, *,
                        timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether the engine's /v1/models (at `url`) lists `model`: the health gate's second
    half, since an engine can answer /health before it serves the model."""
    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=timeout_s),
                               allow_redirects=False) as r:
            if r.status != 200:
                return False
            body = await r.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return False
    data = body.get("data") if isinstance(body, dict) else None
    return isinstance(data, list) and any(
        isinstance(d, dict) and d.get("id") == model for d in data
    )


def _os_error_text(err: OSError) -> str:
    # asyncio's refused connect carries no strerror ("Connect call failed ('127.0.0.1', 1)").
    if isinstance(err, ConnectionRefusedError):
        return "connection refused"
    return err.strerror or str(err) or type(err).__name__


ProbeOnce = Callable[[str, float], Awaitable[ProbeResult]]


@dataclass(frozen=True, slots=True)
class WaitResult:
    healthy: bool
    waited_s: float
    probes: int
    last: ProbeResult
    process_gone: bool = False


async def wait_healthy(
    url: str,
    *,
    timeout_s: float,
    interval_s: float = DEFAULT_INTERVAL_S,
    probe_timeout_s: float = PROBE_TIMEOUT_S,
    probe_once: ProbeOnce | None = None,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    alive: Callable[[], bool] | None = None,
) -> WaitResult:
    """Probe `url` every `interval_s` until HTTP 200 or `timeout_s` has passed.

    One probe always runs, and one runs at (about) the deadline, each bounded by what is left
    (at least MIN_PROBE_TIMEOUT_S), so the whole wait overruns `timeout_s` by at most that.
    `probe_once`, `clock` and `sleep` are for tests; by default one session serves all probes.
    `alive` (the engine's process still runs) ends the wait early when it says no: an engine
    that died while loading will not become healthy.
    """
    if probe_once is None:
        async with aiohttp.ClientSession() as session:

            async def with_session(u: str, t: float) -> ProbeResult:
                return await probe(u, timeout_s=t, session=session)

            return await wait_healthy(
                url,
                timeout_s=timeout_s,
                interval_s=interval_s,
                probe_timeout_s=probe_timeout_s,
                probe_once=with_session,
                clock=clock,
                sleep=sleep,
                alive=alive,
            )
    start = clock()
    deadline = start + timeout_s
    probes = 0
    while True:
        left = deadline - clock()
        result = await probe_once(url, max(MIN_PROBE_TIMEOUT_S, min(probe_timeout_s, left)))
        probes += 1
        now = clock()
        gone = not result.ok and alive is not None and not alive()
        if result.ok or now >= deadline or gone:
            return WaitResult(
                healthy=result.ok, waited_s=now - start, probes=probes, last=result,
                process_gone=gone,
            )
        await sleep(min(interval_s, deadline - now))


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_url(_ctx: click.Context, _param: click.Parameter, value: str) -> str:
    if not value.startswith(("http://", "https://")):
        raise click.BadParameter(f"expected an http:// or https:// URL, got {value!r}")
    return value


@click.command("wait-healthy")
@click.option(
    "--url", required=True, callback=_check_url, help="The engine's health URL (HTTP 200 = ready)."
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0),
    required=True,
    help="Give up after this many seconds (exit 1).",
)
@click.option(
    "--interval",
    "interval_s",
    type=click.FloatRange(min=0.01),
    default=DEFAULT_INTERVAL_S,
    show_default=True,
    help="Seconds between probes.",
)
@click.option(
    "--pid",
    type=int,
    default=0,
    help="The engine's process ($MAINPID): stop waiting (exit 1) when it has exited.",
)
def wait_healthy_command(url: str, timeout_s: float, interval_s: float, pid: int) -> None:
    """Poll URL until it answers HTTP 200 (exit 0) or TIMEOUT seconds pass (exit 1).

    The engine unit's ExecStartPost: the unit is "active" only once the engine serves."""
    alive = (lambda: pid_alive(pid)) if pid > 0 else None
    result = asyncio.run(
        wait_healthy(url, timeout_s=timeout_s, interval_s=interval_s, alive=alive)
    )
    if result.process_gone:
        click.echo(
            f"wait-healthy: {url}: the engine (pid {pid}) exited before it became healthy "
            f"({result.waited_s:.1f} s, last {result.last.describe()})",
            err=True,
        )
        sys.exit(EXIT_UNHEALTHY)
    plural = "" if result.probes == 1 else "s"
    if result.healthy:
        click.echo(
            f"wait-healthy: {url}: healthy (HTTP 200) after {result.waited_s:.1f} s, "
            f"{result.probes} probe{plural}",
            err=True,
        )
        return
    click.echo(
        f"wait-healthy: {url}: not healthy after {result.waited_s:.1f} s "
        f"({result.probes} probe{plural}, timeout {timeout_s:g} s): "
        f"last {result.last.describe()}",
        err=True,
    )
    sys.exit(EXIT_UNHEALTHY)
