"""`sparkd sim-engine`: the simulated engine, a test double for a real inference engine.

It behaves like vLLM, SGLang or llama.cpp wherever sparkd can observe one, and nowhere else:

    start ──▶ listening, loading (/health 503) ──▶ ready (/health 200, OpenAI routes served)
                  │  │                                │
                  │  └─ --hang-on-start: stays here   ├─ --crash-after F: exit 1 at F s
                  │                                   ├─ --stall-after S: S s after ready, no
                  │                                   │  more tokens (requests hang, /health 200)
                  │                                   └─ --ramp-mib-per-s R: resident memory
                  │                                      grows R MiB/s (to --ramp-max-mib)
                  └─ empty, unwritable model dir: exit 2
    SIGTERM or SIGINT in any state: exit 0 within a second.

The replies are deterministic text; the speed (--tokens-per-second, --speculative) is real.
`/metrics` exports vLLM's two liveness series (`vllm:generation_tokens_total`,
`vllm:num_requests_running`; vllm/v1/metrics/loggers.py, commit 005a810b) in Prometheus text.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import mmap
import os
import signal
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import click
from aiohttp import web

from sparkd.sim import behaviour, loading, responses
from sparkd.sim.behaviour import JSON, ApiError, Generation
from sparkd.sim.responses import Envelope, Reply

log = logging.getLogger(__name__)

EXIT_CRASHED: Final = 1
EXIT_BAD_MODEL_DIR: Final = 2
SHUTDOWN_GRACE_S: Final = 0.25  # in-flight requests get this long after SIGTERM
MAX_BODY_BYTES: Final = 32 * 1024 * 1024
MOE_BACKEND_ENV: Final = "VLLM_FLASHINFER_MOE_BACKEND"


@dataclass(frozen=True, slots=True)
class EngineOptions:
    model: str
    path: Path
    host: str
    port: int
    load_seconds: float = 2.0
    resident_mib: int = 64
    weights_mib: int = 32
    crash_after: float | None = None
    hang_on_start: bool = False
    strict_alternation: bool = False
    speculative: bool = False
    tokens_per_second: float = 200.0
    stall_after: float | None = None  # seconds after ready; None: never stalls
    ramp_mib_per_s: float = 0.0  # 0: no ramp
    ramp_max_mib: int = 1024


RAMP_STEP_S: Final = 0.02  # the ramp allocates this often
RAMP_BLOCK: Final = 8 * 1024 * 1024  # at most this much at a time


@dataclass(slots=True)
class EngineState:
    created: int
    ready: bool = False
    resident: list[bytearray] | None = None  # held for the process's life so the RSS stays up
    generated_tokens: int = 0  # vllm:generation_tokens_total
    requests_running: int = 0  # vllm:num_requests_running
    stalled: asyncio.Event | None = None  # set: no more tokens (--stall-after)
    ramp: list[bytearray] = dataclasses.field(default_factory=list)


class LoadFailed(Exception):
    def __init__(self, exit_code: int, message: str) -> None:
        super().__init__(message)
        self.exit_code = exit_code
        self.message = message


OPTIONS: Final = web.AppKey("options", EngineOptions)
STATE: Final = web.AppKey("state", EngineState)


# --- HTTP ------------------------------------------------------------------------------------


def build_app(options: EngineOptions, state: EngineState) -> web.Application:
    app = web.Application(middlewares=[openai_errors], client_max_size=MAX_BODY_BYTES)
    app[OPTIONS] = options
    app[STATE] = state
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_get("/metrics", metrics)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    return app


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def openai_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error leaves as an OpenAI-style JSON body, including aiohttp's own 404/405/413."""
    try:
        return await handler(request)
    except ApiError as exc:
        return web.json_response(exc.body(), status=exc.status)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        headers = {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None
        body = ApiError(exc.status, exc.reason).body()
        return web.json_response(body, status=exc.status, headers=headers)
    except Exception:  # a bug in the test double; bad input never gets here
        log.exception("internal error answering %s %s", request.method, request.path)
        body = ApiError(500, "internal error in the simulated engine").body()
        return web.json_response(body, status=500)


async def health(request: web.Request) -> web.Response:
    if request.app[STATE].ready:
        return web.json_response({"status": "ok"})
    return web.json_response({"status": "loading"}, status=503)


async def metrics(request: web.Request) -> web.Response:
    """The two series sparkd's liveness rule reads, as vLLM names and types them."""
    state, model = request.app[STATE], request.app[OPTIONS].model
    text = (
        "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
        "# TYPE vllm:num_requests_running gauge\n"
        f'vllm:num_requests_running{{engine="0",model_name="{model}"}} '
        f"{float(state.requests_running)}\n"
        "# HELP vllm:generation_tokens_total Number of generation tokens processed.\n"
        "# TYPE vllm:generation_tokens_total counter\n"
        f'vllm:generation_tokens_total{{engine="0",model_name="{model}"}} '
        f"{float(state.generated_tokens)}\n"
    )
    return web.Response(text=text, content_type="text/plain", charset="utf-8")


def _require_ready(request: web.Request) -> None:
    if not request.app[STATE].ready:
        raise ApiError(503, "The model is still loading.")


async def models(request: web.Request) -> web.Response:
    _require_ready(request)
    options, state = request.app[OPTIONS], request.app[STATE]
    body = responses.model_list(options.model, created=state.created, root=str(options.path))
    return web.json_response(body)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    _require_ready(request)
    options = request.app[OPTIONS]
    gen = behaviour.parse_chat_request(
        behaviour.decode_json_body(await request.read()),
        served_model=options.model,
        strict_alternation=options.strict_alternation,
    )
    reply = responses.plan_reply(gen)
    env = Envelope(id=f"chatcmpl-{uuid.uuid4().hex}", created=int(time.time()), model=options.model)
    return await _answer(request, gen, reply, responses.chat_chunks(reply, gen, env),
                         lambda: responses.chat_completion(reply, gen, env))


async def completions(request: web.Request) -> web.StreamResponse:
    _require_ready(request)
    options = request.app[OPTIONS]
    gen = behaviour.parse_completion_request(
        behaviour.decode_json_body(await request.read()), served_model=options.model
    )
    reply = responses.plan_reply(gen)
    env = Envelope(id=f"cmpl-{uuid.uuid4().hex}", created=int(time.time()), model=options.model)
    return await _answer(request, gen, reply, responses.text_chunks(reply, gen, env),
                         lambda: responses.text_completion(reply, gen, env))


async def _answer(request: web.Request, gen: Generation, reply: Reply,
                  chunks: Iterable[tuple[JSON, bool]], whole: Callable[[], JSON]
                  ) -> web.StreamResponse:
    """Stream `chunks` or decode and send `whole()`, counted as a running request meanwhile
    (what the /metrics gauge reports)."""
    rate = _rate(request.app[OPTIONS], gen)
    state = request.app[STATE]
    state.requests_running += 1
    try:
        if gen.stream:
            return await _stream(request, chunks, rate)
        await _decode(state, reply, rate)
        return web.json_response(whole())
    finally:
        state.requests_running -= 1


def _rate(options: EngineOptions, gen: Generation) -> float:
    return behaviour.decode_rate(
        options.tokens_per_second, speculative=options.speculative, workload=gen.workload
    )


async def _decode(state: EngineState, reply: Reply, rate: float) -> None:
    """Generate the reply's tokens at `rate`, counting them as they come (a tenth of a second
    at a time); a stalled engine stops counting and never finishes."""
    loop = asyncio.get_running_loop()
    start, done, total = loop.time(), 0, reply.completion_tokens
    while done < total:
        await _unless_stalled(state)
        step = min(total - done, max(1, int(rate / 10)))
        done += step
        await asyncio.sleep(max(0.0, start + done / rate - loop.time()))
        state.generated_tokens += step


async def _unless_stalled(state: EngineState) -> None:
    """Wait forever once stalled (--stall-after): a deadlocked engine's requests hang."""
    if state.stalled is not None and state.stalled.is_set():
        await asyncio.Event().wait()


async def _stream(
    request: web.Request, chunks: Iterable[tuple[JSON, bool]], rate: float
) -> web.StreamResponse:
    response = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await response.prepare(request)
    state = request.app[STATE]
    loop = asyncio.get_running_loop()
    start, tokens = loop.time(), 0
    try:
        for payload, paced in chunks:
            if paced:
                # A schedule, not a sleep per token: the rate holds however long writes take.
                tokens += 1
                await _unless_stalled(state)
                await asyncio.sleep(max(0.0, start + tokens / rate - loop.time()))
                state.generated_tokens += 1
            await response.write(responses.sse_event(payload))
        await response.write(responses.SSE_DONE)
        await response.write_eof()
    except ConnectionResetError:
        log.info("client went away during a stream")
    return response


# --- lifecycle -------------------------------------------------------------------------------


async def run_engine(options: EngineOptions, *, started: float) -> int:
    """Listen at once, load, serve until told to stop; return the exit status."""
    state = EngineState(created=int(time.time()))
    runner = web.AppRunner(
        build_app(options, state), access_log=None, shutdown_timeout=SHUTDOWN_GRACE_S
    )
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, options.host, options.port).start()
        except OSError as exc:
            # Exit 1, not 2: an old engine still holding the port is worth a restart.
            log.error("cannot listen on %s:%d: %s", options.host, options.port, exc)
            return EXIT_CRASHED
        log.info("listening on %s:%d (loading: /health answers 503)", options.host, options.port)
        return await _supervise(options, state, started)
    finally:
        await runner.cleanup()


async def _supervise(options: EngineOptions, state: EngineState, started: float) -> int:
    loop = asyncio.get_running_loop()
    outcome: asyncio.Future[int] = loop.create_future()

    def finish(code: int) -> None:
        if not outcome.done():
            outcome.set_result(code)

    def on_signal(signum: signal.Signals) -> None:
        log.info("received %s, shutting down", signum.name)
        finish(0)

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_signal, signum)
    cancel = threading.Event()
    tasks = [asyncio.create_task(_load_and_serve(options, state, started, cancel, finish))]
    if options.crash_after is not None:
        tasks.append(asyncio.create_task(_crash_later(started + options.crash_after, finish)))
    try:
        return await outcome
    finally:
        cancel.set()  # the loading thread stops at its next chunk
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)


async def _load_and_serve(
    options: EngineOptions,
    state: EngineState,
    started: float,
    cancel: threading.Event,
    finish: Callable[[int], None],
) -> None:
    try:
        state.resident = await asyncio.to_thread(_load, options, cancel.is_set)
    except LoadFailed as exc:
        log.error("%s", exc.message)
        finish(exc.exit_code)
        return
    except loading.LoadCancelled:
        return
    await asyncio.sleep(max(0.0, started + options.load_seconds - time.monotonic()))
    if options.hang_on_start:
        log.warning("hanging before ready (simulated, --hang-on-start): /health stays 503")
        await asyncio.Event().wait()
    state.ready = True
    log.info("ready on %s:%d", options.host, options.port)
    ready_at = time.monotonic()
    await asyncio.gather(_stall_later(options, state),
                         _ramp(options, state, ready_at))


async def _stall_later(options: EngineOptions, state: EngineState) -> None:
    if options.stall_after is None:
        return
    state.stalled = asyncio.Event()
    await asyncio.sleep(options.stall_after)
    state.stalled.set()
    log.warning("stalled (simulated, --stall-after %g s): no more tokens, /health still "
                "answers 200", options.stall_after)


def burn(processes: int) -> None:
    """Fork `processes` children that spin on the CPU until this process is gone (they
    poll their parent: an engine unit's stop or SIGKILL of the main process ends them)."""
    parent = os.getpid()
    for _ in range(processes):
        if os.fork() == 0:
            n = 0
            while True:
                n += 1
                if n % 1_000_000 == 0 and os.getppid() != parent:
                    os._exit(0)
    if processes:
        log.warning("burning the CPU with %d processes (simulated, --burn-processes)",
                    processes)


async def _ramp(options: EngineOptions, state: EngineState, began: float) -> None:
    """Grow resident memory at --ramp-mib-per-s to --ramp-max-mib: an engine that keeps
    allocating. A block every RAMP_STEP_S, each page written (really resident)."""
    if options.ramp_mib_per_s <= 0:
        return
    log.warning("ramping resident memory at %g MiB/s to %d MiB (simulated, --ramp-mib-per-s)",
                options.ramp_mib_per_s, options.ramp_max_mib)
    held = 0
    limit = options.ramp_max_mib * loading.MIB
    while held < limit:
        await asyncio.sleep(RAMP_STEP_S)
        due = min(limit, int((time.monotonic() - began) * options.ramp_mib_per_s * loading.MIB))
        # Faulting pages in holds the GIL: a block at a time in a thread, each small, so that
        # the loop still answers SIGTERM and /health promptly when the ramp outruns the machine.
        while held < due:
            size = min(due - held, RAMP_BLOCK)
            state.ramp.append(await asyncio.to_thread(_resident_block, size))
            held += size
    log.info("ramp done: %d MiB more resident", options.ramp_max_mib)


def _resident_block(size: int) -> bytearray:
    block = bytearray(size)
    block[:: mmap.PAGESIZE] = b"\x01" * len(range(0, size, mmap.PAGESIZE))
    return block


def _load(options: EngineOptions, cancelled: Callable[[], bool]) -> list[bytearray]:
    """The blocking part of loading, run in a thread."""
    began = time.monotonic()
    # vLLM logs the MoE backend it chose; sparkd's log fingerprints match this line.
    log.info("Using FlashInfer MoE backend: %s", os.environ.get(MOE_BACKEND_ENV, "throughput"))
    path = options.path
    try:
        if not path.is_dir() or not loading.model_files(path):
            written = loading.write_synthetic_weights(
                path, options.weights_mib, cancelled=cancelled
            )
            log.info("wrote synthetic weights %s (%d MiB)", written, options.weights_mib)
    except OSError as exc:
        raise LoadFailed(
            EXIT_BAD_MODEL_DIR,
            f"model directory {path} has no files and synthetic weights cannot be written there: "
            f"{exc.strerror or exc}",
        ) from None
    try:
        read = loading.read_files(loading.model_files(path), cancelled=cancelled)
    except OSError as exc:
        raise LoadFailed(EXIT_CRASHED, f"cannot read model files in {path}: {exc}") from None
    log.info(
        "loaded %d files (%.1f MiB) in %.2f s",
        read.files,
        read.bytes / loading.MIB,
        time.monotonic() - began,
    )
    resident = loading.allocate_resident(options.resident_mib, cancelled=cancelled)
    log.info("resident memory: %d MiB", options.resident_mib)
    return resident


async def _crash_later(at: float, finish: Callable[[int], None]) -> None:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    log.error("simulated crash (--crash-after)")
    # The last line of the traceback a CUDA OOM leaves in a real engine's journal.
    print("torch.OutOfMemoryError: CUDA out of memory (simulated)", file=sys.stderr, flush=True)
    finish(EXIT_CRASHED)


# --- command ---------------------------------------------------------------------------------


@click.command("sim-engine", context_settings={"show_default": True})
@click.option("--model", required=True, metavar="NAME", help="The model id it serves.")
@click.option(
    "--path",
    required=True,
    metavar="DIR",
    type=click.Path(file_okay=False, path_type=Path),
    help="Model directory: read fully; synthetic weights are written there when it is empty.",
)
@click.option("--host", default="127.0.0.1", help="Address to listen on.")
@click.option("--port", required=True, type=click.IntRange(1, 65535), help="Port to listen on.")
@click.option("--load-seconds", default=2.0, type=click.FloatRange(min=0), help="Total load time.")
@click.option(
    "--resident-mib", default=64, type=click.IntRange(min=0), help="Resident memory to hold."
)
@click.option(
    "--weights-mib", default=32, type=click.IntRange(min=1), help="Size of synthetic weights."
)
@click.option(
    "--crash-after",
    type=click.FloatRange(min=0),
    default=None,
    help="Exit 1 after this many seconds, with a CUDA-OOM-like line.",
)
@click.option("--hang-on-start", is_flag=True, help="Never become ready (/health stays 503).")
@click.option(
    "--strict-alternation",
    is_flag=True,
    help="Reject chats whose roles do not alternate, as SGLang does for Mistral (HTTP 400).",
)
@click.option(
    "--speculative",
    is_flag=True,
    help="Speed like EAGLE: 2.5x for free text, 0.6x for JSON and tool calls.",
)
@click.option(
    "--stall-after",
    type=click.FloatRange(min=0),
    default=None,
    help="Seconds after ready when token generation stops for good while /health stays 200 "
    "(a deadlocked engine).",
)
@click.option(
    "--ramp-mib-per-s",
    default=0.0,
    type=click.FloatRange(min=0),
    help="After ready, grow resident memory this fast (an engine that keeps allocating).",
)
@click.option(
    "--ramp-max-mib",
    default=1024,
    type=click.IntRange(min=0),
    help="Where the ramp stops.",
)
@click.option(
    "--burn-processes",
    default=0,
    type=click.IntRange(0, 256),
    help="Processes that spin on the CPU from the start (an engine that burns every core).",
)
@click.option(
    "--tokens-per-second",
    default=200.0,
    type=click.FloatRange(min=0, min_open=True),
    help="Base decode speed.",
)
def command(
    *,
    model: str,
    path: Path,
    host: str,
    port: int,
    load_seconds: float,
    resident_mib: int,
    weights_mib: int,
    crash_after: float | None,
    hang_on_start: bool,
    strict_alternation: bool,
    speculative: bool,
    tokens_per_second: float,
    stall_after: float | None,
    ramp_mib_per_s: float,
    ramp_max_mib: int,
    burn_processes: int,
) -> None:
    """The simulated engine (a test double): an OpenAI-compatible server sparkd can supervise."""
    started = time.monotonic()
    logging.basicConfig(
        level=logging.INFO, format="%(levelname)s %(message)s", stream=sys.stderr, force=True
    )
    options = EngineOptions(
        model=model,
        path=path,
        host=host,
        port=port,
        load_seconds=load_seconds,
        resident_mib=resident_mib,
        weights_mib=weights_mib,
        crash_after=crash_after,
        hang_on_start=hang_on_start,
        strict_alternation=strict_alternation,
        speculative=speculative,
        tokens_per_second=tokens_per_second,
        stall_after=stall_after,
        ramp_mib_per_s=ramp_mib_per_s,
        ramp_max_mib=ramp_max_mib,
    )
    log.info("sparkd simulated engine (a test double) for %s from %s", options.model, options.path)
    burn(burn_processes)
    sys.exit(asyncio.run(run_engine(options, started=started)))
