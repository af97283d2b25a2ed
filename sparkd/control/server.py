"""The daemon's end of the control socket: a Unix socket only root and group members may use.

Access is checked twice: the socket file is mode 0660 owned by root:GROUP, and each
connection's peer credentials (SO_PEERCRED) must be uid 0 or a member of GROUP, so a
mis-set mode (or a socket passed around) does not open the door. Code that engines run (a
`trust_remote_code` model) never gets in (issue 10): engine units cannot see the socket's
directory (InaccessiblePaths=, rendered in every engine unit), the engine user is refused even
when an administrator made it a member of GROUP, and so is any process in an engine unit's
cgroup, whatever its user.

Hostile or broken clients (issue 10) cannot take the socket down:

- at most `max_connections` at once, kept below the descriptor limit with `FD_HEADROOM`
  descriptors to spare; one more is answered `busy` and closed at once;
- a request connection that has not sent a complete line within `idle_timeout_s` is answered
  `timeout` and closed (subscribe streams are long-lived by design and have no such limit);
- a request line is at most MAX_REQUEST_LINE bytes; deeply nested JSON gets an error reply;
- when accept() fails (no descriptors or memory left), the log gets one line per
  `LOG_INTERVAL_S` with a count, not a traceback per try (asyncio's own accept loop logged one
  per try: 79 MB in 30 s under 1,100 connections).

The accept loop is sparkd's own (`loop.sock_accept` and `connect_accepted_socket`) rather than
`asyncio.start_unix_server`, whose accept errors go to the loop's exception handler.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import logging
import os
import pwd
import re
import resource
import socket
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

from sparkd.control.protocol import (
    MAX_REQUEST_LINE,
    Busy,
    Request,
    RequestTimeout,
    decode_request,
    encode,
    error_reply,
    ok_reply,
)
from sparkd.errors import BadRequest, PermissionDenied, SparkdError

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Any]]
StreamHandler = Callable[[Request], AsyncIterator[Any]]

MAX_CONNECTIONS: Final = 256
#: Descriptors kept for the daemon's own work (D-Bus, the journal, state files, health probes)
#: when the connection limit is derived from RLIMIT_NOFILE.
FD_HEADROOM: Final = 64
#: Seconds a request connection may take to send a complete line (sparkctl and the gateway
#: send theirs at once).
REQUEST_IDLE_TIMEOUT_S: Final = 10.0
#: Seconds a reply may take to be taken by a client that stopped reading.
WRITE_TIMEOUT_S: Final = 30.0
#: At most one log line per this many seconds for each kind of accept trouble.
LOG_INTERVAL_S: Final = 10.0
#: Pause after a failed accept(): descriptors come back as connections close.
ACCEPT_RETRY_S: Final = 0.1
_RESOURCE_ERRNOS: Final = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# A cgroup path (any hierarchy, any depth: nspawn containers nest it) inside an engine unit.
_ENGINE_CGROUP_RE: Final = re.compile(r"/(sparkd-engine@[^/\n]*\.service)(?:/|\n|\Z)")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end of a Unix socket."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    pid, uid, gid = struct.unpack("3i", raw)
    return pid, uid, gid


def group_id(name: str) -> int | None:
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        return None


def user_id(name: str) -> int | None:
    try:
        return pwd.getpwnam(name).pw_uid
    except KeyError:
        return None


def uid_in_group(uid: int, gid: int, primary_gid: int) -> bool:
    if primary_gid == gid:
        return True
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return gid in os.getgrouplist(user.pw_name, user.pw_gid)


def engine_unit_of(cgroup_text: str) -> str | None:
    """PURE: the engine unit a process belongs to, from the text of /proc/PID/cgroup."""
    match = _ENGINE_CGROUP_RE.search(cgroup_text)
    return match.group(1) if match else None


def peer_engine_unit(pid: int) -> str | None:
    try:
        return engine_unit_of(Path(f"/proc/{pid}/cgroup").read_text())
    except OSError:
        return None  # gone already, or no /proc: the other checks still hold


def connection_limit(wanted: int, *, soft_nofile: int) -> int:
    """Connections the server holds at most: `wanted`, but never within FD_HEADROOM of the
    descriptor limit (one descriptor per connection)."""
    return max(1, min(wanted, soft_nofile - FD_HEADROOM))


class RateLimitedLog:
    """One warning per `interval_s` at most; the lines left out are counted in the next."""

    def __init__(self, logger: logging.Logger, interval_s: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._log = logger
        self._interval = interval_s
        self._clock = clock
        self._last: float | None = None
        self._suppressed = 0

    def warning(self, msg: str, *args: object) -> None:
        now = self._clock()
        if self._last is not None and now - self._last < self._interval:
            self._suppressed += 1
            return
        if self._suppressed:
            msg += " (%d more like it in the last %.0f s)"
            args = (*args, self._suppressed, now - (self._last or now))
        self._log.warning(msg, *args)
        self._last = now
        self._suppressed = 0


class ControlServer:
    def __init__(
        self,
        path: Path,
        *,
        group: str,
        handler: Handler,
        streams: Mapping[str, StreamHandler] | None = None,
        refuse_user: str | None = None,
        max_connections: int = MAX_CONNECTIONS,
        idle_timeout_s: float = REQUEST_IDLE_TIMEOUT_S,
    ) -> None:
        self.path = path
        self.group = group
        self.refuse_user = refuse_user
        self.idle_timeout_s = idle_timeout_s
        self._wanted_connections = max_connections
        self._handler = handler
        self._streams = dict(streams or {})
        self._sock: socket.socket | None = None
        self._accepting: asyncio.Task[None] | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._gid: int | None = None
        self._refused_uid: int | None = None
        self.max_connections = max_connections
        self._accept_log = RateLimitedLog(log, LOG_INTERVAL_S)
        self._busy_log = RateLimitedLog(log, LOG_INTERVAL_S)

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._gid = group_id(self.group)
        self._refused_uid = user_id(self.refuse_user) if self.refuse_user else None
        soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.max_connections = connection_limit(self._wanted_connections, soft_nofile=soft)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(self.path))
            # Mode and owner before listen(): no connection can arrive before they are set.
            os.chmod(self.path, 0o660)
            if self._gid is not None:
                os.chown(self.path, 0, self._gid)
            else:
                log.warning("group %r does not exist: only root can use %s", self.group,
                            self.path)
            sock.listen(128)
            sock.setblocking(False)  # noqa: FBT003
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._accepting = asyncio.create_task(self._accept_loop(sock), name="control-accept")

    async def close(self) -> None:
        if self._accepting is not None:
            self._accepting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._accepting
            self._accepting = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        # Subscribers never hang up on their own: close every connection (FACTS.md, Python
        # 3.12's wait_closed() waits for them).
        connections = list(self._connections)
        for task in connections:
            task.cancel()
        await asyncio.gather(*connections, return_exceptions=True)

    async def _accept_loop(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                conn, _addr = await loop.sock_accept(sock)
            except OSError as exc:
                if exc.errno in _RESOURCE_ERRNOS:
                    self._accept_log.warning(
                        "cannot accept on %s: %s (out of descriptors or memory: %d "
                        "connections held); retrying", self.path, exc.strerror,
                        len(self._connections))
                    await asyncio.sleep(ACCEPT_RETRY_S)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EAGAIN, errno.EINTR):
                    continue
                raise
            if len(self._connections) >= self.max_connections:
                self._refuse_busy(conn)
                continue
            task = asyncio.create_task(self._connection(conn))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    def _refuse_busy(self, conn: socket.socket) -> None:
        with conn:
            conn.setblocking(False)  # noqa: FBT003
            err = Busy(f"sparkd holds {self.max_connections} connections, its limit: "
                       "try again")
            with contextlib.suppress(OSError):
                conn.send(encode(error_reply(err)))
        self._busy_log.warning("refused a connection on %s: %d connections held (the limit)",
                               self.path, self.max_connections)

    async def _connection(self, conn: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader(limit=MAX_REQUEST_LINE, loop=loop)
        protocol = asyncio.StreamReaderProtocol(reader, loop=loop)
        try:
            transport, _ = await loop.connect_accepted_socket(lambda: protocol, sock=conn)
        except OSError:
            conn.close()
            return
        writer = asyncio.StreamWriter(transport, protocol, reader, loop)
        await self._serve(conn, reader, writer)

    def _refusal(self, sock: socket.socket) -> PermissionDenied | None:
        pid, uid, gid = peer_credentials(sock)
        if self._refused_uid is not None and uid == self._refused_uid:
            return PermissionDenied(
                f"uid {uid} may not use sparkd: it is the engine user {self.refuse_user!r} "
                "(code an engine runs may not drive sparkd)")
        unit = peer_engine_unit(pid) if pid > 0 else None
        if unit is not None:
            return PermissionDenied(
                f"pid {pid} may not use sparkd: it runs in the engine unit {unit} (code an "
                "engine runs may not drive sparkd)")
        if uid == 0 or (self._gid is not None and uid_in_group(uid, self._gid, gid)):
            return None
        return PermissionDenied(
            f"uid {uid} may not use sparkd: be root or a member of group {self.group!r}")

    async def _send(self, writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        async with asyncio.timeout(WRITE_TIMEOUT_S):
            writer.write(encode(reply))
            await writer.drain()

    async def _serve(self, sock: socket.socket, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:
        try:
            refusal = self._refusal(sock)
            if refusal is not None:
                await self._send(writer, error_reply(refusal))
                return
            while True:
                try:
                    async with asyncio.timeout(self.idle_timeout_s):
                        line = await reader.readline()
                except TimeoutError:
                    await self._send(writer, error_reply(RequestTimeout(
                        f"no complete request within {self.idle_timeout_s:g} s")))
                    return
                except (ValueError, asyncio.LimitOverrunError):
                    await self._send(writer, error_reply(BadRequest(
                        f"request line too long (at most {MAX_REQUEST_LINE} bytes)")))
                    return
                if not line:
                    return
                stream = self._stream_for(line)
                if stream is not None:
                    # The connection now carries this stream until either side closes it.
                    async for item in stream:
                        await self._send(writer, ok_reply(item))
                    return
                await self._send(writer, await self._answer(line))
        except (ConnectionError, BrokenPipeError, TimeoutError):
            return  # the client went away, or stopped reading its replies
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError, BrokenPipeError):
                await writer.wait_closed()

    def _stream_for(self, line: bytes) -> AsyncIterator[Any] | None:
        try:
            request = decode_request(line)
        except SparkdError:
            return None  # _answer replies with the error
        handler = self._streams.get(request.method)
        return handler(request) if handler else None

    async def _answer(self, line: bytes) -> dict[str, Any]:
        try:
            request = decode_request(line)
            return ok_reply(await self._handler(request))
        except SparkdError as exc:
            return error_reply(exc)
        except Exception as exc:
            # A bug in one handler must not take the socket down with it.
            log.exception("control request failed")
            return error_reply(SparkdError(f"internal error: {exc}"))
