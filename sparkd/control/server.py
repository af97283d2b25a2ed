"""The daemon's end of the control socket: a Unix socket only root and group members may use.

Access is checked twice: the socket file is mode 0660 owned by root:GROUP, and each
connection's peer credentials (SO_PEERCRED) must be uid 0 or a member of GROUP, so a
mis-set mode (or a socket passed around) does not open the door.
"""

from __future__ import annotations

import asyncio
import contextlib
import grp
import logging
import os
import pwd
import socket
import struct
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any

from sparkd.control.protocol import (
    MAX_LINE,
    Request,
    decode_request,
    encode,
    error_reply,
    ok_reply,
)
from sparkd.errors import BadRequest, PermissionDenied, SparkdError

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Any]]
StreamHandler = Callable[[Request], AsyncIterator[Any]]

# How long close() waits for the connections it ended to finish their cleanup.
CLOSE_TIMEOUT_S = 1.0


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


def uid_in_group(uid: int, gid: int, primary_gid: int) -> bool:
    if primary_gid == gid:
        return True
    try:
        user = pwd.getpwuid(uid)
    except KeyError:
        return False
    return gid in os.getgrouplist(user.pw_name, user.pw_gid)


class ControlServer:
    def __init__(
        self,
        path: Path,
        *,
        group: str,
        handler: Handler,
        streams: Mapping[str, StreamHandler] | None = None,
    ) -> None:
        self.path = path
        self.group = group
        self._handler = handler
        self._streams = dict(streams or {})
        self._server: asyncio.AbstractServer | None = None
        self._gid: int | None = None
        # The task serving each open connection, ended by close().
        self._clients: set[asyncio.Task[None]] = set()
        self._closing = False

    async def start(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        self._gid = group_id(self.group)
        self._server = await asyncio.start_unix_server(
            self._serve, path=str(self.path), limit=MAX_LINE
        )
        os.chmod(self.path, 0o660)
        if self._gid is not None:
            os.chown(self.path, 0, self._gid)
        else:
            log.warning("group %r does not exist: only root can use %s", self.group, self.path)

    async def close(self) -> None:
        """Stop listening and end every connection, then return.

        The connections are ended here, not waited for: since Python 3.12,
        `Server.wait_closed()` waits until every client connection has closed (CPython
        gh-79033), and a client may hold one open for good (the gateway's event stream, an
        idle or stuck client), which made `systemctl stop sparkd` wait for SIGKILL."""
        if self._server is not None:
            self._server.close()
            self._closing = True
            for task in self._clients:
                task.cancel()
            if self._clients:
                await asyncio.wait(set(self._clients), timeout=CLOSE_TIMEOUT_S)
            await self._server.wait_closed()
            self._server = None

    def _allowed(self, sock: socket.socket) -> tuple[bool, int]:
        _pid, uid, gid = peer_credentials(sock)
        if uid == 0:
            return True, uid
        return (self._gid is not None and uid_in_group(uid, self._gid, gid)), uid

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._clients.add(task)
        try:
            sock = writer.get_extra_info("socket")
            allowed, uid = self._allowed(sock)
            if not allowed:
                err = PermissionDenied(
                    f"uid {uid} may not use sparkd: be root or a member of group {self.group!r}"
                )
                writer.write(encode(error_reply(err)))
                await writer.drain()
                return
            while True:
                try:
                    line = await reader.readline()
                except (ValueError, asyncio.LimitOverrunError):
                    writer.write(encode(error_reply(BadRequest("request line too long"))))
                    await writer.drain()
                    return
                if not line:
                    return
                stream = self._stream_for(line)
                if stream is not None:
                    # The connection now carries this stream until either side closes it.
                    async for item in stream:
                        writer.write(encode(ok_reply(item)))
                        await writer.drain()
                    return
                writer.write(encode(await self._answer(line)))
                await writer.drain()
        except (ConnectionError, BrokenPipeError):
            return
        except asyncio.CancelledError:
            if self._closing:
                # Ended by close(): a normal end (3.11's stream callback would log a
                # cancelled connection task as an error).
                return
            raise
        finally:
            try:
                writer.close()
                with contextlib.suppress(ConnectionError, BrokenPipeError):
                    await writer.wait_closed()
            except asyncio.CancelledError:
                if not self._closing:
                    raise
            finally:
                # Only now: close() waits for a connection until it is closed for good.
                if task is not None:
                    self._clients.discard(task)

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
