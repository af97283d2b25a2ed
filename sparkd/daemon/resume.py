"""After an unclean boot: resume the partial downloads of the configured models in the
background (issue 12: "re-verify ... any partial downloads, repair what has a source").

A power cut in the middle of `sparkctl pull` leaves `.NAME.part` files beside a manifest
pinned to a commit (sparkd/store/model.py `pull_model` saves it before it fetches). Before
this, only the next `sparkctl pull` resumed them. Now, once sparkd is READY after an unclean
boot, each configured model that has a `source` and partial files is verified and repaired
(`preflight_verify_async` with repair: only the missing and bad files are fetched, a partial
resumed from its bytes on disk, each hashed whole) one model at a time:

- never before READY, and never for the model being started at boot: that one is verified
  (and repaired, when it has a source) by its own start's preflight, which refuses it when
  its files cannot be made whole, and sparkd then falls back to the last good model
  (Supervisor._fall_back);
- a swap's preflight of a model being resumed waits for the resume (`Resumer.guard`): two
  writers never fill one partial file;
- bounded: RESUME_ATTEMPTS tries per model (each with the store's own retries inside),
  RESUME_BACKOFF_S apart; then a journal event says to run `sparkctl pull NAME`;
- offline (the source's host does not accept a connection within CONNECT_TIMEOUT_S): one
  event, and nothing more this boot (no retry storm against a network that is not there);
- each step is a journal event (SPARKD_EVENT=boot_resume_*) with its duration.

Pure over the callables it is given (verify, connect, sleep, clock); the daemon's composition
root (application.py) passes the real ones.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import urllib.parse
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Final

from sparkd.config import Config, ModelConfig
from sparkd.errors import SparkdError
from sparkd.journal import event
from sparkd.store.plan import VerifyReport

log = logging.getLogger(__name__)

RESUME_ATTEMPTS: Final = 3
RESUME_BACKOFF_S: Final = (30.0, 120.0)  # before the 2nd and the 3rd try
CONNECT_TIMEOUT_S: Final = 5.0
HUB_ENDPOINT: Final = "https://huggingface.co"

Verify = Callable[[Config, ModelConfig], Awaitable[VerifyReport]]


@dataclass(frozen=True, slots=True)
class Resumed:
    model: str
    ok: bool
    attempts: int
    detail: str


def models_with_partials(config: Config, skip: Iterable[str]) -> list[str]:
    """Blocking (a stat walk of each model directory): the configured models with a source
    whose directory holds partial downloads, `skip` left out."""
    from sparkd.store.verify import scan_model_dir

    left_out = set(skip)
    return [name for name, m in config.models.items()
            if m.source is not None and name not in left_out
            and scan_model_dir(m.path).local.partials]


def endpoint_address(endpoint: str | None) -> tuple[str, int]:
    """(host, port) of the Hub endpoint ($HF_ENDPOINT, or huggingface.co)."""
    url = urllib.parse.urlsplit(endpoint or HUB_ENDPOINT)
    port = url.port or (443 if url.scheme == "https" else 80)
    return url.hostname or "", port


async def can_connect(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> str | None:
    """None when a TCP connection to host:port opens within timeout_s; the reason if not."""
    try:
        _reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port),
                                                 timeout_s)
    except (OSError, TimeoutError) as exc:
        return str(exc) or type(exc).__name__
    writer.close()
    return None


class Resumer:
    """The background resume, and the guard a swap's preflight takes for the same model."""

    def __init__(self) -> None:
        self._locks: dict[str, asyncio.Lock] = {}

    def _lock(self, model: str) -> asyncio.Lock:
        return self._locks.setdefault(model, asyncio.Lock())

    def guard(self, verify: Verify) -> Verify:
        """`verify`, waiting first for a resume of the same model to end."""
        async def guarded(config: Config, model: ModelConfig) -> VerifyReport:
            async with self._lock(model.name):
                return await verify(config, model)
        return guarded

    async def run(
        self,
        config: Config,
        *,
        skip: Iterable[str],
        verify: Verify,
        find: Callable[[Config, Iterable[str]], Awaitable[list[str]]],
        connect: Callable[[], Awaitable[str | None]],
        sleep: Callable[[float], Awaitable[None]],
        clock: Callable[[], float],
        attempts: int = RESUME_ATTEMPTS,
        backoff_s: tuple[float, ...] = RESUME_BACKOFF_S,
    ) -> list[Resumed]:
        began = clock()
        names = await find(config, skip)
        if not names:
            return []
        event(log, "boot_resume_found", "after the unclean shutdown: partial downloads of %s;"
              " resuming them in the background", ", ".join(names),
              SPARKD_DURATION_MS=f"{(clock() - began) * 1000:.0f}")
        unreachable = await connect()
        if unreachable is not None:
            took = clock() - began
            event(log, "boot_resume_offline", "the models' source is unreachable (%s): the "
                  "partial downloads of %s stay as they are until `sparkctl pull NAME` (no "
                  "retry this boot)", unreachable, ", ".join(names), level=logging.WARNING,
                  SPARKD_DURATION_MS=f"{took * 1000:.0f}")
            return [Resumed(n, ok=False, attempts=0, detail=f"offline: {unreachable}")
                    for n in names]
        return [await self._one(config, name, verify=verify, sleep=sleep, clock=clock,
                                attempts=attempts, backoff_s=backoff_s) for name in names]

    async def _one(self, config: Config, name: str, *, verify: Verify,
                   sleep: Callable[[float], Awaitable[None]], clock: Callable[[], float],
                   attempts: int, backoff_s: tuple[float, ...]) -> Resumed:
        model = dataclasses.replace(config.models[name], repair=True)
        detail = ""
        for attempt in range(1, attempts + 1):
            began = clock()
            try:
                async with self._lock(name):
                    report = await verify(config, model)
            except SparkdError as exc:
                took = clock() - began
                detail = exc.message
                again = attempt < attempts
                wait = backoff_s[min(attempt - 1, len(backoff_s) - 1)] if again else 0.0
                event(log, "boot_resume_failed", "resuming %s's download failed (try %d of "
                      "%d) in %.1f s: %s; %s", name, attempt, attempts, took, detail,
                      f"trying again in {wait:.0f} s" if again else
                      f"giving up this boot: run `sparkctl pull {name}`",
                      level=logging.WARNING if again else logging.ERROR, SPARKD_MODEL=name,
                      SPARKD_DURATION_MS=f"{took * 1000:.0f}")
                if again:
                    await sleep(wait)
                continue
            took = clock() - began
            event(log, "boot_resume_done", "resumed %s's download: %d files verified, %d "
                  "bytes fetched, in %.1f s", name, len(report.verdicts),
                  report.fetched_bytes, took, SPARKD_MODEL=name,
                  SPARKD_DURATION_MS=f"{took * 1000:.0f}")
            return Resumed(name, ok=True, attempts=attempt, detail="")
        return Resumed(name, ok=False, attempts=attempts, detail=detail)
