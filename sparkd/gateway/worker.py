"""The gateway's worker process: large request bodies are prepared (`prepare.prepare`: parse,
check, classify, rewrite, encode) there, off the gateway's event loop.

Why a process and not a thread: parsing JSON and encoding it again are single C calls that
hold the GIL throughout (a thread parsing 4 MB of `[],[],...` kept the event loop from running
for 196 ms; a 32 MiB body of one string takes 26 ms to parse and 80 ms to encode again). The
loop must answer /health within 50 ms whatever a client sends. Small bodies (up to
`INLINE_MAX_BYTES`, at most a few milliseconds of work whatever their shape) are prepared on
the loop: a round trip to the worker costs more than they do.

The worker is this python running `sparkd.gateway.worker.main` (`worker_argv`), started on
first use, one request at a time over its stdin and stdout. A frame is two lengths (network
order, 4 bytes each), a pickle of the small values, then the body's bytes (not pickled: no
copy of it on the loop). The answer carries the rewritten body only when the rewrite changed
it. A worker that dies (killed, out of memory) fails the request it had with 503
`worker_failed`, and the next request starts a new one.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import pickle
import signal
import struct
import sys
import traceback
from pathlib import Path
from typing import IO, Any, Final

import sparkd
from sparkd.gateway.classify import Workload
from sparkd.gateway.errors import GatewayError
from sparkd.gateway.prepare import Prepared, Recipe, model_name, prepare

log = logging.getLogger(__name__)

INLINE_MAX_BYTES: Final = 16 * 1024
_FRAME: Final = struct.Struct("!II")
_CLOSE_TIMEOUT_S: Final = 2.0
# Large bodies waiting for (or in) the worker at most: past it, 503 worker_busy at once, so a
# client sending many maximal bodies neither holds the gateway's memory nor makes everyone
# else's large request wait behind an unbounded queue.
MAX_QUEUED: Final = 8


def worker_argv() -> tuple[str, ...]:
    """The gateway's own python, isolated (`-I`, as /usr/bin/sparkd runs), finding sparkd where
    the gateway found it: the .deb's code is not on python's default path (the sparkd wrapper
    adds /usr/lib/sparkd/python), so `python -m sparkd.gateway.worker` would not start."""
    root = str(Path(sparkd.__file__).resolve().parent.parent)
    code = f"import sys; sys.path.insert(0, {root!r}); from sparkd.gateway.worker import main;" \
           " main()"
    return (sys.executable, "-I", "-c", code)


class PrepareWorker:
    """The client side: `prepare` as a coroutine, run in the worker process."""

    def __init__(self, argv: tuple[str, ...] | None = None) -> None:
        self.argv = argv or worker_argv()
        self._proc: asyncio.subprocess.Process | None = None
        self._recipe: Recipe | None = None  # the recipe the running worker holds
        self._lock = asyncio.Lock()
        self._closed = False
        self.queued = 0

    async def prepare(self, raw: bytes, recipe: Recipe, *, chat: bool, user_agent: str,
                      workload: Workload | None) -> Prepared:
        value, out = await self._call(raw, recipe, ("prepare", chat, user_agent[:1024],
                                                    workload))
        assert isinstance(value, Prepared)
        return dataclasses.replace(value, raw=out if value.changes else raw)

    async def model_name(self, raw: bytes, recipe: Recipe) -> str | None:
        """`prepare.model_name`, in the worker."""
        value, _ = await self._call(raw, recipe, ("model_name",))
        assert value is None or isinstance(value, str)
        return value

    async def _call(self, raw: bytes, recipe: Recipe, job: tuple[Any, ...]
                    ) -> tuple[object, bytes]:
        if self.queued >= MAX_QUEUED:
            raise GatewayError(503, "worker_busy", f"{self.queued} large request bodies wait "
                               "for the gateway's worker already; retry", retry_after_s=1)
        self.queued += 1
        # Shielded: a client that goes away must not leave its answer in the pipe for the
        # next request to read. The exchange finishes (or the worker is closed) either way.
        exchange = asyncio.ensure_future(self._exchange(raw, recipe, job))
        exchange.add_done_callback(self._dequeue)
        reply, out = await asyncio.shield(exchange)
        kind, value = reply
        if kind == "ok":
            return value, out
        if kind == "refused":
            assert isinstance(value, GatewayError)
            raise value
        log.error("the gateway's worker failed on a request: %s", value)
        raise GatewayError(500, "internal_error", "preparing the request failed (a bug: the"
                           " gateway's log has the traceback)")

    def _dequeue(self, _done: asyncio.Future[Any]) -> None:
        self.queued -= 1

    async def _exchange(self, raw: bytes, recipe: Recipe, values: tuple[Any, ...]
                        ) -> tuple[tuple[str, object], bytes]:
        async with self._lock:
            if self._closed:
                raise GatewayError(503, "shutting_down", "the gateway is stopping",
                                   retry_after_s=1)
            proc = await self._running()
            assert proc.stdin is not None and proc.stdout is not None
            meta = pickle.dumps((recipe if recipe is not self._recipe else None, *values))
            try:
                proc.stdin.write(_FRAME.pack(len(meta), len(raw)) + meta)
                proc.stdin.write(raw)
                await proc.stdin.drain()
                self._recipe = recipe
                meta_len, out_len = _FRAME.unpack(await proc.stdout.readexactly(_FRAME.size))
                reply = pickle.loads(await proc.stdout.readexactly(meta_len))
                out = await proc.stdout.readexactly(out_len) if out_len else b""
            except (OSError, EOFError, asyncio.IncompleteReadError, pickle.UnpicklingError
                    ) as exc:
                await self._discard()
                raise GatewayError(503, "worker_failed",
                                   f"the gateway's worker process failed ({exc!r}); retry",
                                   retry_after_s=1) from None
            return reply, out

    async def _running(self) -> asyncio.subprocess.Process:
        if self._proc is None or self._proc.returncode is not None:
            if self._proc is not None:
                await self._discard()
            self._proc = await asyncio.create_subprocess_exec(
                *self.argv, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
            self._recipe = None
        return self._proc

    async def _discard(self) -> None:
        proc, self._proc, self._recipe = self._proc, None, None
        if proc is None:
            return
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), _CLOSE_TIMEOUT_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def close(self) -> None:
        """Stop the worker (a request it is working on gets 503)."""
        self._closed = True
        proc = self._proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()  # what it works on is lost anyway
        async with self._lock:
            await self._discard()


# --- the worker process ----------------------------------------------------------------------


def serve(stdin: IO[bytes], stdout: IO[bytes]) -> None:
    """Answer frames until stdin ends."""
    recipe: Recipe | None = None
    while True:
        head = stdin.read(_FRAME.size)
        if len(head) < _FRAME.size:
            return
        meta_len, raw_len = _FRAME.unpack(head)
        new_recipe, job, *args = pickle.loads(stdin.read(meta_len))
        raw = stdin.read(raw_len)
        recipe = new_recipe if new_recipe is not None else recipe
        out = b""
        reply: tuple[str, object]
        try:
            if recipe is None:
                raise RuntimeError("no recipe sent")
            if job == "model_name":
                reply = ("ok", model_name(raw, allow_remote=recipe.allow_remote_images))
            else:
                chat, user_agent, workload = args
                result = prepare(raw, recipe, chat=chat, user_agent=user_agent,
                                 workload=workload)
                out = result.raw if result.changes else b""
                reply = ("ok", dataclasses.replace(result, raw=b""))
        except GatewayError as exc:
            reply = ("refused", exc)
        except Exception:  # a bug: reported, and the worker goes on
            reply = ("failed", traceback.format_exc())
        meta = pickle.dumps(reply)
        stdout.write(_FRAME.pack(len(meta), len(out)) + meta)
        stdout.write(out)
        stdout.flush()


def main() -> None:
    # Ctrl-C on `sparkd gateway` reaches the whole process group: the gateway stops its worker.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    serve(sys.stdin.buffer, sys.stdout.buffer)

