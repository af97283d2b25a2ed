"""sparkctl's end of the control socket. Blocking and small: no asyncio on the CLI path."""

from __future__ import annotations

import contextlib
import json
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sparkd.control.protocol import MAX_LINE, encode, error_from_reply
from sparkd.errors import ConfigError, DaemonUnreachable, PermissionDenied, SparkdError

if TYPE_CHECKING:
    from sparkd.control.status import Status

# A command that starts sparkd whatever stopped it: a unit that failed, or hit its start limit,
# must be reset first (`systemctl start` alone is refused then).
START_HINT = "systemctl reset-failed sparkd; systemctl start sparkd"


def socket_path(config_file: Path | None) -> Path:
    """The control socket named by the config (default /run/sparkd/control.sock).

    A broken config must not cut the operator off from the daemon, which still runs on its
    last good one: warn on stderr, and use the default socket.
    """
    from sparkd.config import DEFAULT_CONFIG_PATH, DaemonConfig, config_path, load_config

    path = config_path(config_file)
    default = DaemonConfig().control_socket
    if not path.exists() and path == DEFAULT_CONFIG_PATH:
        return default
    try:
        return load_config(path).daemon.control_socket
    except ConfigError as exc:
        print(f"sparkctl: warning: {exc.message} (trying {default})", file=sys.stderr)
        return default


def status(path: Path, *, timeout_s: float = 10.0) -> Status:
    """The daemon's status, checked against the schema (SchemaError when it does not fit)."""
    from sparkd.control.status import Status

    return Status.from_json(call(path, "status", timeout_s=timeout_s))


def call(path: Path, method: str, params: dict[str, Any] | None = None, *,
         timeout_s: float = 10.0) -> Any:
    """Send one request and return its result, or raise the daemon's error."""
    sock = _connect(path, timeout_s)
    try:
        # The daemon may refuse (and close) before reading: its reply is still there.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(encode({"method": method, "params": params or {}}))
        buf = b""
        while not buf.endswith(b"\n"):
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            except TimeoutError:
                raise DaemonUnreachable(
                    f"sparkd did not answer within {timeout_s:g} s on {path}"
                ) from None
            if not chunk:
                break
            buf += chunk
            if len(buf) > MAX_LINE:
                raise SparkdError("reply from sparkd is too long")
    finally:
        sock.close()
    if not buf:
        raise DaemonUnreachable(f"sparkd closed {path} without answering")
    reply = json.loads(buf)
    if reply.get("ok"):
        return reply.get("result")
    raise _known(error_from_reply(reply.get("error")))


def _connect(path: Path, timeout_s: float | None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout_s)
    try:
        sock.connect(str(path))
    except FileNotFoundError:
        sock.close()
        raise DaemonUnreachable(
            f"sparkd is not running (no control socket at {path}); why: journalctl -u sparkd "
            f"-n 20; start it: {START_HINT}"
        ) from None
    except PermissionError:
        sock.close()
        raise PermissionDenied(
            f"permission denied on {path}: run as root or join group sparkd"
        ) from None
    except ConnectionRefusedError:
        sock.close()
        raise DaemonUnreachable(
            f"sparkd is not running (nothing listens on {path}); why: journalctl -u sparkd "
            f"-n 20; start it: {START_HINT}"
        ) from None
    return sock


def _known(exc: SparkdError) -> SparkdError:
    for cls in (PermissionDenied, DaemonUnreachable):
        if exc.code == cls.code:
            return cls(exc.message)
    return exc


def stream(path: Path, method: str, params: dict[str, Any] | None = None, *,
           timeout_s: float | None = None) -> Iterator[Any]:
    """A streaming request (`subscribe`): yields each result until the daemon closes it.
    `timeout_s` bounds the wait for each message (TimeoutError past it)."""
    sock = _connect(path, timeout_s)
    try:
        sock.sendall(encode({"method": method, "params": params or {}}))
        with sock.makefile("rb") as lines:
            for line in lines:
                reply = json.loads(line)
                if not reply.get("ok"):
                    raise _known(error_from_reply(reply.get("error")))
                yield reply.get("result")
    finally:
        sock.close()
