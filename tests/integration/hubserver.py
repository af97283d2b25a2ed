"""A local Hugging Face Hub on loopback (a test double), with fault injection and a request log.

It answers what huggingface_hub and sparkd ask for, shaped like the real Hub:

- `GET /api/models/ORG/REPO[/revision/REV]` (with `?blobs=true`, which `files_metadata=True`
  sends): `id`, `sha` (the commit), `siblings` with `rfilename`, `size`, `blobId` and, for LFS
  files, `lfs: {size, sha256, pointerSize}`;
- `HEAD|GET /ORG/REPO/resolve/REV/FILE` on the hub's origin: `X-Repo-Commit`, `ETag`; an LFS
  file answers 302 to the CDN (another port: another origin, as cdn-lfs.hf.co is) with
  `X-Linked-Etag` (its SHA-256) and `X-Linked-Size`; a small file is served directly;
- `HEAD|GET /cdn/SHA256` on the CDN's origin: the bytes, with `Range: bytes=A-` / `A-B`
  answered 206 with `Content-Range`, or 416.

Faults are queued per file and used by that file's next body responses (hub or CDN), one each:
`cut(n)` closes the connection after n bytes of a response that announced the full length,
`short(n)` ends the response cleanly n bytes early, `corrupt()` flips bytes (same size),
`status(503)` answers an error, `stall(n, seconds)` sends n bytes then goes quiet, `slow(bps)`
trickles the bytes, `ignore_range()` answers 200 with the whole file to a Range request.
Every request is logged: which origin, method, file, the Range start, the
status, the body bytes sent, whether it carried Authorization.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

GIT_LFS_THRESHOLD = 10 * 1024  # files at least this big are "LFS" in this fake


@dataclass(frozen=True)
class Fault:
    kind: str  # cut | short | corrupt | status | stall | slow
    n: int = 0  # bytes (cut, short, stall), HTTP status (status), bytes/s (slow)
    seconds: float = 0.0  # stall


def cut(n: int) -> Fault:
    return Fault("cut", n)


def short(n: int) -> Fault:
    return Fault("short", n)


def corrupt() -> Fault:
    return Fault("corrupt")


def status(code: int) -> Fault:
    return Fault("status", code)


def stall(n: int, seconds: float) -> Fault:
    return Fault("stall", n, seconds)


def slow(bytes_per_s: int) -> Fault:
    return Fault("slow", bytes_per_s)


def ignore_range() -> Fault:
    """Answer 200 with the whole file whatever Range asked (servers may)."""
    return Fault("ignore-range")


@dataclass(frozen=True)
class Logged:
    origin: str  # "hub" or "cdn"
    method: str
    route: str  # "api", "resolve" or "cdn"
    file: str | None  # the repository path the request was for
    range_start: int | None
    status: int
    sent: int  # body bytes written
    authorized: bool
    seq: int = 0  # arrival order (a stalled response is logged when it ends)


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str
    branches: dict[str, str] = field(default_factory=dict)
    digests: dict[str, tuple[str, str]] = field(default_factory=dict)  # (sha256, git sha1)

    def __post_init__(self) -> None:
        self.digests = {p: (sha256(d), git_blob_sha1(d)) for p, d in self.files.items()}


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data, usedforsecurity=False).hexdigest()


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def is_lfs(data: bytes) -> bool:
    return len(data) >= GIT_LFS_THRESHOLD


class FakeHub:
    """Runs the hub and CDN apps on one loop in a thread; start() / stop()."""

    def __init__(self) -> None:
        self.repos: dict[str, Repo] = {}
        self.faults: dict[str, list[Fault]] = {}
        self.log: list[Logged] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fake-hub")
        self._runners: list[web.AppRunner] = []
        self.hub_port = 0
        self.cdn_port = 0
        self._handlers: set[asyncio.Task[Any]] = set()
        self._arrivals = itertools.count(1)
        # Bytes per second for bodies without a fault (None: as fast as the loop goes); the
        # pull benchmark paces the "link" with it, for curl and the pull alike.
        self.rate: float | None = None

    # --- set-up ---------------------------------------------------------------------------

    def add_repo(self, repo_id: str, files: dict[str, bytes], *, commit: str | None = None) -> Repo:
        repo = Repo(files=dict(files), commit=commit or "0" * 40, branches={})
        if commit is None:
            tree = repr(sorted(repo.digests.items())).encode()
            repo.commit = hashlib.sha1(tree, usedforsecurity=False).hexdigest()
        repo.branches["main"] = repo.commit
        self.repos[repo_id] = repo
        return repo

    def inject(self, path: str, *faults: Fault) -> None:
        with self._lock:
            self.faults.setdefault(path, []).extend(faults)

    def reset_log(self) -> None:
        self.wait_idle()
        with self._lock:
            self.log.clear()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub_port}"

    def wait_idle(self, timeout: float = 10) -> None:
        """Until every body response has ended (a stalled one logs itself when it ends)."""
        deadline = time.monotonic() + timeout
        while self._handlers:
            assert time.monotonic() < deadline, "the fake hub is still serving"
            time.sleep(0.01)

    def body_requests(self, file: str | None = None) -> list[Logged]:
        """GETs that carried a file's bytes (the CDN's, and the hub's for small files)."""
        self.wait_idle()
        with self._lock:
            found = [
                e
                for e in self.log
                if e.method == "GET"
                and (e.route == "cdn" or (e.route == "resolve" and e.status != 302))
                and (file is None or e.file == file)
            ]
        return sorted(found, key=lambda e: e.seq)

    # --- life -----------------------------------------------------------------------------

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(30)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _start(self) -> None:
        hub = web.Application()
        hub.router.add_get("/api/models/{org}/{name}", self._api)
        hub.router.add_get("/api/models/{org}/{name}/revision/{rev}", self._api)
        hub.router.add_route("*", "/{org}/{name}/resolve/{rev}/{file:.+}", self._resolve)
        cdn = web.Application()
        cdn.router.add_route("*", "/cdn/{sha}", self._cdn)
        for app in (hub, cdn):
            runner = web.AppRunner(app, shutdown_timeout=1.0, access_log=None)
            await runner.setup()
            site = web.TCPSite(runner, "127.0.0.1", 0)
            await site.start()
            self._runners.append(runner)
        self.hub_port = self._port(self._runners[0])
        self.cdn_port = self._port(self._runners[1])

    @staticmethod
    def _port(runner: web.AppRunner) -> int:
        port: int = runner.addresses[0][1]
        return port

    async def _stop(self) -> None:
        for task in list(self._handlers):
            task.cancel()
        for runner in self._runners:
            await runner.cleanup()

    # --- handlers -------------------------------------------------------------------------

    def _repo(self, request: web.Request) -> tuple[str, Repo, str]:
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        repo = self.repos.get(repo_id)
        if repo is None:
            raise web.HTTPNotFound(
                headers={"X-Error-Code": "RepoNotFound"}, text='{"error":"Repository not found"}'
            )
        rev = request.match_info.get("rev", "main")
        commit = repo.branches.get(rev, rev)
        if commit != repo.commit:
            raise web.HTTPNotFound(
                headers={"X-Error-Code": "RevisionNotFound"}, text='{"error":"Invalid rev id"}'
            )
        return repo_id, repo, commit

    def _record(self, request: web.Request, entry: Logged) -> None:
        with self._lock:
            self.log.append(entry)

    async def _api(self, request: web.Request) -> web.Response:
        try:
            repo_id, repo, commit = self._repo(request)
        except web.HTTPException as exc:
            self._record(
                request, Logged("hub", "GET", "api", None, None, exc.status, 0, authorized=False)
            )
            raise
        blobs = request.query.get("blobs") in ("True", "true", "1")
        siblings = []
        for path, data in sorted(repo.files.items()):
            item: dict[str, Any] = {"rfilename": path}
            if blobs:
                digest, blob_id = repo.digests[path]
                item["size"] = len(data)
                item["blobId"] = blob_id  # (for LFS files the pointer's, on the real Hub)
                if is_lfs(data):
                    item["lfs"] = {"size": len(data), "sha256": digest, "pointerSize": 134}
            siblings.append(item)
        body = {"id": repo_id, "modelId": repo_id, "sha": commit, "siblings": siblings,
                "private": False, "tags": []}
        self._record(request, Logged("hub", "GET", "api", None, None, 200, 0,
                                     "Authorization" in request.headers))
        return web.json_response(body)

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        file = request.match_info["file"]
        try:
            _repo_id, repo, commit = self._repo(request)
            if file not in repo.files:
                raise web.HTTPNotFound(headers={"X-Error-Code": "EntryNotFound"})
        except web.HTTPException as exc:
            self._record(request, Logged("hub", request.method, "resolve", file, None,
                                         exc.status, 0, authorized=False))
            raise
        data = repo.files[file]
        digest, blob_id = repo.digests[file]
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes"}
        if is_lfs(data):
            headers.update(
                {
                    "ETag": f'"{blob_id}"',
                    "X-Linked-Etag": f'"{digest}"',
                    "X-Linked-Size": str(len(data)),
                    "Location": f"http://127.0.0.1:{self.cdn_port}/cdn/{digest}",
                    "Content-Length": "0",
                }
            )
            self._record(request, Logged("hub", request.method, "resolve", file, None, 302, 0,
                                         "Authorization" in request.headers))
            return web.Response(status=302, headers=headers)
        headers["ETag"] = f'"{blob_id}"'
        return await self._serve(request, "hub", "resolve", file, data, headers)

    async def _cdn(self, request: web.Request) -> web.StreamResponse:
        wanted = request.match_info["sha"]
        for repo in self.repos.values():
            for path, data in repo.files.items():
                if is_lfs(data) and repo.digests[path][0] == wanted:
                    headers = {"ETag": f'"{wanted}"', "Accept-Ranges": "bytes"}
                    return await self._serve(request, "cdn", "cdn", path, data, headers)
        self._record(
            request, Logged("cdn", request.method, "cdn", None, None, 404, 0, authorized=False)
        )
        raise web.HTTPNotFound()

    async def _serve(
        self,
        request: web.Request,
        origin: str,
        route: str,
        file: str,
        data: bytes,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        task = asyncio.current_task()
        assert task is not None
        self._handlers.add(task)
        try:
            return await self._serve_body(request, origin, route, file, data, headers)
        finally:
            self._handlers.discard(task)

    async def _serve_body(
        self,
        request: web.Request,
        origin: str,
        route: str,
        file: str,
        data: bytes,
        headers: dict[str, str],
    ) -> web.StreamResponse:
        authorized = "Authorization" in request.headers
        seq = next(self._arrivals)
        start = 0
        status_code = 200
        with self._lock:
            queue = self.faults.get(file) if request.method == "GET" else None
            fault = queue.pop(0) if queue else None
        wanted_range = "" if fault and fault.kind == "ignore-range" else request.headers.get(
            "Range", "")
        match = re.match(r"^bytes=(\d+)-(\d*)$", wanted_range)
        asked = re.match(r"^bytes=(\d+)-", request.headers.get("Range", ""))
        range_start = int(asked.group(1)) if asked else None
        if match:
            start = int(match.group(1))
            end = int(match.group(2)) if match.group(2) else len(data) - 1
            if start >= len(data) or end < start:
                self._record(request, Logged(origin, request.method, route, file, range_start,
                                             416, 0, authorized))
                return web.Response(status=416, headers={"Content-Range": f"bytes */{len(data)}"})
            status_code = 206
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            body = data[start : end + 1]
        else:
            body = data
        if fault is not None and fault.kind == "status":
            self._record(request, Logged(origin, request.method, route, file, range_start,
                                         fault.n, 0, authorized, seq))
            return web.Response(status=fault.n, text="injected error")
        response = web.StreamResponse(status=status_code, headers=headers)
        response.content_length = len(body)
        response.content_type = "application/octet-stream"
        await response.prepare(request)
        sent = 0
        if request.method == "HEAD":
            self._record(request, Logged(origin, "HEAD", route, file, range_start, status_code, 0,
                                         authorized))
            return response
        try:
            sent = await self._write_body(request, response, body, fault)
        finally:
            self._record(request, Logged(origin, "GET", route, file, range_start, status_code,
                                         sent, authorized, seq))
        return response

    async def _write_body(
        self, request: web.Request, response: web.StreamResponse, body: bytes, fault: Fault | None
    ) -> int:
        transport = request.transport
        assert transport is not None
        kind = fault.kind if fault else None
        if kind == "corrupt":
            flipped = bytearray(body)
            for i in range(0, len(flipped), max(1, len(flipped) // 7)):
                flipped[i] ^= 0xFF
            body = bytes(flipped)
        if kind in ("cut", "short", "stall"):
            assert fault is not None
            n = min(fault.n, len(body))
            await response.write(body[:n])
            while transport.get_write_buffer_size() and not transport.is_closing():
                await asyncio.sleep(0.005)  # the n bytes really left, then the fault
            if kind == "stall":
                await asyncio.sleep(fault.seconds)
            if kind == "cut":
                transport.abort()  # a reset: no clean end of the body
            else:
                transport.close()  # a clean close, fewer bytes than Content-Length
            return n
        if kind == "slow":
            assert fault is not None
            piece = max(1, fault.n // 20)
            sent = 0
            for i in range(0, len(body), piece):
                try:
                    await response.write(body[i : i + piece])
                except ConnectionResetError:  # the client went away (kill -9)
                    return sent
                sent += len(body[i : i + piece])
                await asyncio.sleep(0.05)
            await response.write_eof()
            return sent
        view = memoryview(body)
        began = time.monotonic()
        for i in range(0, len(body), 1 << 20):
            await response.write(view[i : i + (1 << 20)])
            if self.rate:
                ahead = began + (i + (1 << 20)) / self.rate - time.monotonic()
                if ahead > 0:
                    await asyncio.sleep(ahead)
        await response.write_eof()
        return len(body)


def run_hub() -> Iterator[FakeHub]:
    hub = FakeHub()
    hub.start()
    try:
        yield hub
    finally:
        hub.stop()


def dump(hub: FakeHub) -> str:
    return json.dumps([e.__dict__ for e in hub.log], indent=1)
