"""sparkd's own transfer: ranged, resumable, hashed while it downloads, checked at the end.

Why not `hf_hub_download`: it resumes with a Range header and then checks only the size, not
the content (huggingface_hub issue 2364), and `snapshot_download` has reported success for
blobs whose content did not match (issue 3643). sparkd trusts no transport: every byte it
keeps is hashed, the resumed prefix included (re-read from disk, since a power cut can leave
anything there), and a file is renamed into place only when its whole digest matches.

Why aiohttp (not urllib): it follows the Hub's redirect to its CDN and drops `Authorization`
when the redirect leaves the Hub's origin (urllib's redirect handler forwards it), it has a
per-read timeout (a stalled transfer is noticed without a watchdog thread), it raises on a body
shorter than its Content-Length, and N files at once are N tasks on one loop. The bytes go
from aiohttp's buffers into the partial file (`pwrite`, in a thread of the file's own) and into
the hash (in another; both release the GIL), in 4 MiB batches, up to four of them behind the
socket, so reading, writing and hashing overlap.

For one file (`FetchJob`):

    partial = DIR/.NAME.part; keep its bytes (resume_from), hash them again from disk
    loop:
        GET url with `Range: bytes=<bytes on disk>-` (none when 0); follow redirects
          206 from the right offset: append     200: start over (the server ignored Range)
          5xx/429, reset, short body, stall: back off, try again from the bytes on disk
          other 4xx: give up on this file (the reason is reported)
        all bytes there: digest matches -> fsync, rename over NAME, fsync the directory
                         digest differs -> empty the partial, fetch the whole file again
                                           (this file only; `hash_attempts` times at most)

Before the first byte, the file system must have room for every byte still to fetch plus
FREE_SPACE_MARGIN (`DiskFull` up front, naming both figures). ENOSPC during the pull (someone
else filled the disk) stops the whole pull with `DiskFull`; the partial files stay, so the next
pull (after space was freed) resumes them.

A transfer that stays below `min_rate_bytes_per_s` over a window of `stall_timeout_s` is
dropped and tried again like a stall (a server trickling a byte every 1.5 s never stalls).

Every file below the model directory is created, renamed and removed through directory
descriptors without following links (sparkd.store.modeldir): a root pull never writes
through a link planted in the directory.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import errno
import os
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Final

import aiohttp

from sparkd.atomic import start_writeback
from sparkd.errors import DiskFull, SparkdError
from sparkd.store.manifest import FileEntry, Stamp
from sparkd.store.modeldir import UnsafePath, open_partial, open_root, open_subdir, refuse_link
from sparkd.store.plan import (
    FetchJob,
    FetchSettings,
    FileVerdict,
    RateFloor,
    Status,
    bytes_to_fetch,
    judge,
)
from sparkd.store.progress import NullReporter, Reporter
from sparkd.store.verify import BUF_SIZE, Hasher, new_hasher, partial_path

BATCH: Final = 4 << 20  # bytes handed to the writer thread at a time
IN_FLIGHT: Final = 4  # batches written and hashed while the next one is read
_CONTENT_RANGE_RE: Final = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")
#: Free space a pull leaves on top of the bytes it fetches (logs, caches, the journal).
FREE_SPACE_MARGIN: Final = 256 << 20

Sleep = Callable[[float], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class FetchOutcome:
    verdict: FileVerdict
    stamp: Stamp | None  # the file's stamp once in place (OK only)
    transferred: int  # body bytes received in this run


class _Retry(Exception):
    """A transfer failed in a way another try may fix."""


class _GiveUp(Exception):
    """A transfer failed in a way another try will not fix (404, 401, ...)."""


class _Gap(Exception):
    """A batch refused because the one before it was never written."""


class _TooSlow(Exception):
    """A transfer below the minimum rate over a whole window."""


@dataclass(frozen=True, slots=True)
class _Place:
    """Where one file goes: its directory (a descriptor, reached without links), the file and
    its partial (names in that directory; the paths are for messages)."""

    dir_fd: int
    dest: Path
    part: Path

    def install(self) -> None:
        """Rename the partial over the file (renameat: a link at either name is replaced, never
        followed), durably."""
        refuse_link(self.dir_fd, self.dest.name, self.dest)
        os.replace(self.part.name, self.dest.name, src_dir_fd=self.dir_fd,
                   dst_dir_fd=self.dir_fd)
        os.fsync(self.dir_fd)


class _Sink:
    """The partial file and the hash of its bytes so far.

    Batches go to two single-thread executors of the file's own, one writing (`pwrite` at
    each batch's offset, then its writeback started) and one hashing: FIFO both, so bytes are
    written and hashed in order while the socket goes on being read, and up to `IN_FLIGHT`
    batches are on their way at once (a batch waits for no thread hand-off of the one before;
    measured on the 16-core machine, one batch in flight left the hashing thread idle about a
    sixth of the time).

    The bytes on disk are always a contiguous prefix of what was received: a batch is written
    only at `pos` (the end of the last one written), so after a failed write, or a queued
    batch taken back by a cancellation, every later batch is refused. Such a sink is `broken`:
    its hash covers bytes that are not on disk, and only rehash_prefix() or reset() (which
    run when no batch is in flight) make it usable again."""

    def __init__(self, fd: int, entry: FileEntry) -> None:
        self.fd = fd
        self.entry = entry
        self.pos = 0  # bytes written (and hashed) so far
        self.submitted = 0  # bytes handed to the executors so far (pos trails it)
        self.hasher: Hasher = new_hasher(entry.algorithm, entry.size)
        self._writer = concurrent.futures.ThreadPoolExecutor(1, "sparkd-fetch-write")
        self._hashing = concurrent.futures.ThreadPoolExecutor(1, "sparkd-fetch-hash")
        self._failed: BaseException | None = None

    @property
    def broken(self) -> bool:
        """A batch was refused or failed since the last reset/rehash: the hash is not of the
        bytes on disk, and `submitted` is ahead of them."""
        return self._failed is not None or self.submitted != self.pos

    def close(self) -> None:
        self._writer.shutdown(wait=True)
        self._hashing.shutdown(wait=True)

    def reset(self) -> None:
        os.ftruncate(self.fd, 0)
        self.pos = self.submitted = 0
        self.hasher = new_hasher(self.entry.algorithm, self.entry.size)
        self._failed = None

    def rehash_prefix(self, length: int) -> None:
        """Hash the first `length` bytes on disk again: they count only if they are right."""
        self.hasher = new_hasher(self.entry.algorithm, self.entry.size)
        buf = memoryview(bytearray(BUF_SIZE))
        pos = 0
        while pos < length:
            n = os.preadv(self.fd, [buf[: min(BUF_SIZE, length - pos)]], pos)
            if n == 0:
                break
            self.hasher.update(buf[:n])
            pos += n
        self.pos = self.submitted = pos
        self._failed = None

    def submit(self, chunks: Sequence[bytes]) -> concurrent.futures.Future[int]:
        """Append the chunks after every batch submitted before; the future gives the bytes
        written once they are written and hashed (or raises the write's error)."""
        offset = self.submitted
        self.submitted += sum(len(c) for c in chunks)
        hasher = self.hasher
        hashed = self._hashing.submit(_hash_all, hasher, chunks)
        return self._writer.submit(self._write, chunks, offset, hashed)

    def _write(self, chunks: Sequence[bytes], offset: int,
               hashed: concurrent.futures.Future[None]) -> int:
        start = offset
        try:
            if self._failed is not None:
                raise self._failed
            if offset != self.pos:
                # The batch before was never written (taken back off the queue by a
                # cancellation): writing this one would leave a hole.
                self._failed = _Gap(f"batch at byte {offset} after a gap at {self.pos}")
                raise self._failed
            try:
                # One pwrite per chunk: pwritev of the same chunks cost 4x the system time.
                for chunk in chunks:
                    view = memoryview(chunk)
                    while view:
                        n = os.pwrite(self.fd, view, offset)
                        offset += n
                        view = view[n:]
            except OSError as exc:
                self._failed = exc
                raise
            # Start this batch's writeback now (not posix_fadvise(DONTNEED): measured here,
            # it doubled the pull's CPU time), so the fsync before the rename waits for about
            # one batch, not the whole file, and dirty pages stay bounded.
            start_writeback(self.fd, start, offset - start)
        finally:
            hashed.result()  # never leave the hasher running (a failed write aborts the file)
        self.pos = offset
        return offset - start


def _hash_all(hasher: Hasher, chunks: Sequence[bytes]) -> None:
    for chunk in chunks:
        hasher.update(chunk)


class Fetcher:
    """Fetches files of one model into `root` over one aiohttp session."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        *,
        root: Path,
        root_fd: int,
        url_for: Callable[[FileEntry], str],
        settings: FetchSettings,
        reporter: Reporter,
        pool: concurrent.futures.ThreadPoolExecutor,
        sleep: Sleep = asyncio.sleep,
        model: str = "",
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.clock = clock
        self.session = session
        self.root = root
        self.root_fd = root_fd
        self.url_for = url_for
        self.settings = settings
        self.reporter = reporter
        self.pool = pool
        self.sleep = sleep
        self.model = model

    async def _in_thread(self, fn: Callable[[], object]) -> object:
        future = self.pool.submit(fn)
        try:
            return await asyncio.wrap_future(future)
        finally:
            # Never leave a write running on an fd the caller is about to close.
            concurrent.futures.wait([future])

    async def fetch(self, job: FetchJob) -> FetchOutcome:
        entry = job.entry
        dest = self.root / entry.path
        part = partial_path(dest)
        try:
            dir_fd = open_subdir(self.root_fd, self.root, PurePosixPath(entry.path).parent.parts)
        except (UnsafePath, OSError) as exc:
            return self._cannot_write(entry, part, exc)
        try:
            refuse_link(dir_fd, dest.name, dest)
            fd = open_partial(dir_fd, part.name, part)
        except (UnsafePath, OSError) as exc:
            os.close(dir_fd)
            return self._cannot_write(entry, part, exc)
        sink = _Sink(fd, entry)
        try:
            return await self._fetch(job, sink, _Place(dir_fd, dest, part))
        except UnsafePath as exc:
            return self._cannot_write(entry, part, exc)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                kept = os.fstat(fd).st_size
                raise DiskFull(
                    f"disk full while writing {part} ({kept} of {entry.size} bytes kept); "
                    f"free space on that file system and run `sparkctl pull {self.model}` "
                    "again: it resumes from the bytes on disk"
                ) from None
            return self._cannot_write(entry, part, exc)
        finally:
            sink.close()  # its threads are idle: _stream awaited every batch
            os.close(fd)
            os.close(dir_fd)

    def _cannot_write(self, entry: FileEntry, part: Path, exc: BaseException) -> FetchOutcome:
        reason = exc.message if isinstance(exc, SparkdError) else f"cannot write {part}: {exc}"
        return FetchOutcome(FileVerdict(entry.path, Status.MISSING, reason), None, 0)

    async def _fetch(self, job: FetchJob, sink: _Sink, place: _Place) -> FetchOutcome:
        entry, policy = job.entry, self.settings.policy
        tries = failures_in_a_row = hash_failures = transferred = 0
        first = True
        while True:
            on_disk = os.fstat(sink.fd).st_size
            if on_disk > entry.size:
                await self._in_thread(sink.reset)  # longer than the file: not a prefix of it
            elif first or on_disk != sink.pos or sink.broken:
                # Bytes on disk count only once hashed again: after a power cut they may be
                # anything. Between tries in this run the hash already covers them, unless a
                # batch was refused (then the hash covers bytes that are not on disk).
                await self._in_thread(lambda n=on_disk: sink.rehash_prefix(n))  # type: ignore[misc]
            first = False
            self.reporter.restart(entry.path, sink.pos)
            if sink.pos < entry.size:
                tries += 1
                before = sink.pos
                try:
                    await self._transfer(sink, self.url_for(entry))
                    reason = ""
                except _Retry as exc:
                    reason = str(exc)
                except _GiveUp as exc:
                    transferred += max(0, sink.pos - before)
                    why = f"{exc} (partial kept: {sink.pos} bytes)"
                    return self._failed(entry, why, transferred)
                moved = sink.pos - before
                transferred += max(0, moved)
                if reason:
                    failures_in_a_row = 1 if moved > 0 else failures_in_a_row + 1
                    if not policy.may_retry(tries):
                        why = f"gave up after {tries} tries: {reason}"
                        return self._failed(entry, why, transferred)
                    delay = policy.delay(failures_in_a_row)
                    self.reporter.retry(entry.path, tries, reason, delay)
                    await self.sleep(delay)
                    continue
            verdict = judge(entry, sink.hasher.hexdigest(), size=sink.pos)
            if verdict.status is Status.OK:
                await self._in_thread(lambda: os.fsync(sink.fd))
                place.install()
                stamp = Stamp.of(os.stat(place.dest.name, dir_fd=place.dir_fd,
                                         follow_symlinks=False))
                ok = FileVerdict(entry.path, Status.OK, f"fetched, {verdict.reason}", hashed=True)
                return FetchOutcome(ok, stamp, transferred)
            hash_failures += 1
            await self._in_thread(sink.reset)
            if hash_failures >= policy.hash_attempts:
                os.unlink(place.part.name, dir_fd=place.dir_fd)
                why = f"{verdict.reason} after {hash_failures} whole-file fetches"
                return self._failed(entry, why, transferred)
            self.reporter.retry(
                entry.path, tries, f"{verdict.reason}: fetching the whole file again", 0.0
            )

    def _failed(self, entry: FileEntry, reason: str, transferred: int) -> FetchOutcome:
        dest = self.root / entry.path
        status = Status.BAD if dest.exists() else Status.MISSING
        return FetchOutcome(FileVerdict(entry.path, status, reason), None, transferred)

    async def _transfer(self, sink: _Sink, url: str) -> None:
        """One request from sink.pos to the end. Raises _Retry or _GiveUp; on return every
        byte of the file is in the sink."""
        size = sink.entry.size
        headers = {"Range": f"bytes={sink.pos}-"} if sink.pos else {}
        try:
            async with self.session.get(url, headers=headers) as resp:
                self._check_response(resp, sink)
                if resp.status == 200 and sink.pos:
                    await self._in_thread(sink.reset)  # the server ignored Range: start over
                await self._stream(resp, sink)
        except (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError) as exc:
            raise _Retry(_describe(exc)) from None
        except TimeoutError as exc:
            if exc.errno is not None:
                raise  # ETIMEDOUT from the disk (a soft NFS mount), not a stalled transfer
            raise _Retry(
                f"stalled: no data for {self.settings.stall_timeout_s:g} s"
            ) from None
        except _TooSlow as exc:
            raise _Retry(str(exc)) from None
        if sink.pos < size:
            raise _Retry(f"short body: the response ended at byte {sink.pos} of {size}")

    def _check_response(self, resp: aiohttp.ClientResponse, sink: _Sink) -> None:
        if resp.status == 429 or resp.status >= 500:
            raise _Retry(f"HTTP {resp.status} {resp.reason or ''}".strip())
        if resp.status == 206:
            match = _CONTENT_RANGE_RE.fullmatch(resp.headers.get("Content-Range", ""))
            if not match or int(match.group(1)) != sink.pos:
                # Not the bytes asked for: keep nothing of it, and ask again from the start.
                sink.reset()
                raise _Retry(f"206 with Content-Range {resp.headers.get('Content-Range')!r}")
            return
        if resp.status == 416:
            sink.reset()  # the partial cannot be a prefix of this file
            raise _Retry("HTTP 416: the partial file is not a prefix; starting over")
        if resp.status != 200:
            raise _GiveUp(f"HTTP {resp.status} {resp.reason or ''} for {resp.url}".strip())

    async def _stream(self, resp: aiohttp.ClientResponse, sink: _Sink) -> None:
        size, path = sink.entry.size, sink.entry.path
        received = sink.pos  # bytes handed to the sink (sink.pos trails it)
        floor = RateFloor(self.settings.min_rate_bytes_per_s, self.settings.stall_timeout_s,
                          start=self.clock(), received=received)
        batch: list[bytes] = []
        batched = 0
        in_flight: collections.deque[asyncio.Future[int]] = collections.deque()

        async def settle_oldest() -> None:
            # Popped only once settled, so that `finally` sees it. (A cancellation while
            # waiting takes a still-queued batch back off the writer's queue: the sink then
            # refuses every later batch rather than leave a hole.)
            written = await in_flight[0]
            in_flight.popleft()
            self.reporter.advance(path, written)

        try:
            while True:
                chunk, _ = await resp.content.readchunk()
                too_slow = floor.check(self.clock(), received + len(chunk))
                if too_slow:
                    raise _TooSlow(too_slow)
                if len(chunk) > size - received:
                    # More bytes than the manifest's size: not this file. Keep what fits and
                    # let the digest decide (a wrong one is fetched again).
                    chunk = chunk[: size - received]
                if chunk:
                    batch.append(chunk)
                    batched += len(chunk)
                    received += len(chunk)
                end = not chunk or received >= size
                if batch and (batched >= BATCH or end):
                    while len(in_flight) >= IN_FLIGHT:
                        await settle_oldest()
                    chunks, batch, batched = batch, [], 0
                    in_flight.append(asyncio.wrap_future(sink.submit(chunks)))
                if end:
                    break
        finally:
            # Bytes that arrived are kept, also when the transfer broke off: the next try
            # asks only for what comes after them. Every batch is settled before leaving
            # (the first error raised once the rest are done).
            if batch:
                in_flight.append(asyncio.wrap_future(sink.submit(batch)))
            cancelled: asyncio.CancelledError | None = None
            error: BaseException | None = None
            while in_flight:
                future = in_flight.popleft()
                try:
                    self.reporter.advance(path, await future)
                except asyncio.CancelledError as exc:
                    cancelled = exc
                except BaseException as exc:  # re-raised below, once every batch settled
                    error = error or exc
            if cancelled is not None:
                raise cancelled  # a cancellation outranks a batch's own error
            if error is not None:
                raise error


def _describe(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, aiohttp.ClientPayloadError):
        return f"body cut short ({text})"
    return f"connection failed ({text})"


async def fetch_files(
    jobs: Sequence[FetchJob],
    *,
    root: Path,
    url_for: Callable[[FileEntry], str],
    headers: dict[str, str],
    settings: FetchSettings,
    reporter: Reporter | None = None,
    sleep: Sleep = asyncio.sleep,
    model: str = "",
) -> list[FetchOutcome]:
    """Fetch the jobs, `settings.concurrency` at a time; an outcome per job, in order.
    Raises DiskFull (up front when the bytes to fetch do not fit; during the pull, the other
    transfers stop and every partial file stays) and UnsafePath (the model directory is a
    link)."""
    reporter = reporter or NullReporter()
    reporter.phase("fetch", [(j.path, j.entry.size, j.resume_from) for j in jobs])
    if not jobs:
        return []
    root_fd = open_root(root)
    try:
        if settings.check_free_space:
            check_free_space(root, os.fstatvfs(root_fd), bytes_to_fetch(jobs), model=model)
        return await _fetch_all(jobs, root=root, root_fd=root_fd, url_for=url_for,
                                headers=headers, settings=settings, reporter=reporter,
                                sleep=sleep, model=model)
    finally:
        os.close(root_fd)


def check_free_space(root: Path, fs: os.statvfs_result, needed: int, *, model: str) -> None:
    """DiskFull unless the file system of `root` has `needed` bytes plus FREE_SPACE_MARGIN
    available to this user (f_bavail: root's reserved blocks do not count)."""
    free = fs.f_bavail * fs.f_frsize
    if free >= needed + FREE_SPACE_MARGIN:
        return
    raise DiskFull(
        f"not enough free space for {model or 'the model'} in {root}: {_size(needed)} to "
        f"fetch plus a margin of {_size(FREE_SPACE_MARGIN)}, {_size(free)} free; free "
        f"{_size(needed + FREE_SPACE_MARGIN - free)} (or point the model's path at a larger "
        "file system) and pull again"
    )


def _size(n: int) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n} bytes"


async def _fetch_all(
    jobs: Sequence[FetchJob],
    *,
    root: Path,
    root_fd: int,
    url_for: Callable[[FileEntry], str],
    headers: dict[str, str],
    settings: FetchSettings,
    reporter: Reporter,
    sleep: Sleep,
    model: str,
) -> list[FetchOutcome]:
    stall = settings.stall_timeout_s
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=stall, sock_read=stall)
    connector = aiohttp.TCPConnector(limit=settings.concurrency)
    gate = asyncio.Semaphore(settings.concurrency)
    with concurrent.futures.ThreadPoolExecutor(
        max_workers=settings.concurrency, thread_name_prefix="sparkd-fetch"
    ) as pool:
        async with aiohttp.ClientSession(
            headers=headers,
            timeout=timeout,
            connector=connector,
            auto_decompress=False,
            read_bufsize=2 * BATCH,  # keep the socket drained while a batch is written
        ) as session:
            fetcher = Fetcher(
                session,
                root=root,
                root_fd=root_fd,
                url_for=url_for,
                settings=settings,
                reporter=reporter,
                pool=pool,
                sleep=sleep,
                model=model,
            )

            async def one(job: FetchJob) -> FetchOutcome:
                async with gate:
                    outcome = await fetcher.fetch(job)
                reporter.file_done(outcome.verdict)
                return outcome

            try:
                async with asyncio.TaskGroup() as group:
                    tasks = [group.create_task(one(job)) for job in jobs]
            except BaseExceptionGroup as eg:
                for exc in eg.exceptions:
                    if isinstance(exc, SparkdError):
                        raise exc from None
                raise
    return [task.result() for task in tasks]
