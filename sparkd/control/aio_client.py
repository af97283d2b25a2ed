"""The asyncio end of the control socket, for long-lived clients (the gateway)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from sparkd.control.protocol import MAX_LINE, encode, error_from_reply
from sparkd.errors import DaemonUnreachable, SchemaError


async def call(path: Path, method: str, params: dict[str, Any] | None = None) -> Any:
    """One request, one reply (raises the daemon's error)."""
    reader, writer = await _connect(path)
    try:
        writer.write(encode({"method": method, "params": params or {}}))
        await writer.drain()
        return _result(await reader.readline(), path)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def subscribe(path: Path) -> AsyncIterator[Any]:
    """The daemon's event stream: {"event": "snapshot", "status": {...}} first, then one
    message per event, each with the full status. Ends when the daemon closes it."""
    reader, writer = await _connect(path)
    try:
        writer.write(encode({"method": "subscribe"}))
        await writer.drain()
        while True:
            line = await reader.readline()
            if not line:
                return
            yield _result(line, path)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def _connect(path: Path) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_unix_connection(str(path), limit=MAX_LINE)
    except (FileNotFoundError, ConnectionRefusedError) as exc:
        raise DaemonUnreachable(f"sparkd is not running (control socket {path}: {exc})") from None


def _result(line: bytes, path: Path) -> Any:
    if not line:
        raise DaemonUnreachable(f"sparkd closed {path} without answering")
    try:
        reply = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise SchemaError(f"a reply from sparkd on {path} is not JSON: {exc}") from None
    if not isinstance(reply, dict):
        raise SchemaError(f"a reply from sparkd on {path} is not a JSON object")
    if reply.get("ok"):
        return reply.get("result")
    raise error_from_reply(reply.get("error"))
