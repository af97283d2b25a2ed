"""The control socket for real: a Unix socket, SO_PEERCRED, sparkctl against it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
import stat
import tempfile
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import status_builders as sb
from click.testing import CliRunner

from sparkd.control import aio_client
from sparkd.control.client import call
from sparkd.control.protocol import MAX_REQUEST_LINE, Request
from sparkd.control.server import FD_HEADROOM, ControlServer, connection_limit, engine_unit_of
from sparkd.control.status import HealthRecord, MemoryRecord, SwapReply
from sparkd.ctl.exits import ExitStatus
from sparkd.ctl.main import cli
from sparkd.errors import BadRequest, DaemonUnreachable, PermissionDenied, SparkdError

STATUS = sb.status(
    daemon=sb.daemon(status_line="a: serving, healthy", uptime_s=75.0),
    active_model="a",
    engines=[sb.engine("a", 9001, main_pid=42, health=HealthRecord(
        ok=True, status=200, error=None, latency_ms=1.5))],
    memory=MemoryRecord(total_bytes=8 << 30, available_bytes=6 << 30,
                        page_cache_bytes=1 << 30),
).to_json()
EVENTS = [sb.event("snapshot", sb.status()).to_json(),
          *(sb.event("changed", sb.status(active_model=m)).to_json() for m in ("a", "b"))]


async def handler(request: Request) -> Any:
    if request.method == "status":
        return STATUS
    if request.method == "boom":
        raise RuntimeError("handler bug")
    raise BadRequest(f"unknown method {request.method!r}")


async def events(request: Request) -> AsyncIterator[Any]:
    for message in EVENTS:
        yield message


class ServerThread:
    def __init__(self, path: Path, group: str,
                 answer: Callable[[Request], Awaitable[Any]] = handler,
                 **options: Any) -> None:
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.server = ControlServer(
            path, group=group, handler=answer, streams={"subscribe": events}, **options
        )
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_until_complete(self.server.start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self.server.close())
        self.loop.close()

    def __enter__(self) -> ServerThread:
        self.thread.start()
        assert self.ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path / "run" / "control.sock", group="sparkd-no-such-group") as s:
        yield s


def raw(path: Path, payload: bytes) -> dict[str, Any]:
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(5)
        s.connect(str(path))
        # A refusal (busy, permission) may close the socket before the request is read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(payload)
        buf = b""
        while not buf.endswith(b"\n"):
            chunk = s.recv(65536)
            if not chunk:
                break
            buf += chunk
    result: dict[str, Any] = json.loads(buf)
    return result


def test_status_round_trip_and_socket_mode(server: ServerThread) -> None:
    assert call(server.path, "status") == STATUS
    assert stat.S_IMODE(server.path.stat().st_mode) == 0o660


def test_malformed_and_unknown_requests_get_errors_and_server_keeps_serving(
    server: ServerThread,
) -> None:
    assert raw(server.path, b"not json\n")["error"]["code"] == "bad-request"
    assert raw(server.path, b"[1]\n")["error"]["code"] == "bad-request"
    assert raw(server.path, b'{"method": 3}\n')["error"]["code"] == "bad-request"
    with pytest.raises(SparkdError, match="unknown method 'nope'") as info:
        call(server.path, "nope")
    assert info.value.code == "bad-request"
    with pytest.raises(SparkdError, match="internal error: handler bug"):
        call(server.path, "boom")
    assert call(server.path, "status") == STATUS


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_peer_credentials_refuse_a_user_outside_the_group() -> None:
    # A directory that user nobody can traverse (pytest's tmp_path is root-only).
    with tempfile.TemporaryDirectory(prefix="sparkd-peercred-") as d:
        os.chmod(d, 0o755)
        with ServerThread(Path(d) / "control.sock", group="sparkd-no-such-group") as server:
            os.chmod(server.path, 0o666)  # even with the file mode open, SO_PEERCRED refuses
            answer = _ask_as_nobody(server.path)
    assert answer == "uid 65534 may not use sparkd: be root or a member of group "\
        "'sparkd-no-such-group'"


def _ask_as_nobody(path: Path) -> str:
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody and ask
        try:
            os.close(read_fd)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            try:
                call(path, "status")
                out = b"allowed"
            except PermissionDenied as exc:
                out = exc.message.encode()
            except Exception as exc:
                out = repr(exc).encode()
            os.write(write_fd, out)
        finally:
            os._exit(0)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as r:
        answer = r.read().decode()
    os.waitpid(pid, 0)
    return answer


def test_no_daemon_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DaemonUnreachable, match="sparkd is not running"):
        call(tmp_path / "none.sock", "status")


def _config(tmp_path: Path, sock: Path) -> Path:
    cfg = tmp_path / "sparkd.toml"
    cfg.write_text(f'[daemon]\ncontrol_socket = "{sock}"\n')
    return cfg


def test_sparkctl_status_json_and_table(server: ServerThread, tmp_path: Path) -> None:
    cfg = _config(tmp_path, server.path)
    runner = CliRunner()
    res = runner.invoke(cli, ["status", "--json", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output) == STATUS
    res = runner.invoke(cli, ["status", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "a: serving, healthy" in res.output
    assert "active/running" in res.output
    assert "6.0 GiB available of 8.0 GiB" in res.output


def test_sparkctl_status_without_daemon_exits_3(tmp_path: Path) -> None:
    cfg = _config(tmp_path, tmp_path / "absent.sock")
    res = CliRunner().invoke(cli, ["status", "--config", str(cfg)])
    assert res.exit_code == int(ExitStatus.DAEMON_UNREACHABLE) == 3
    assert "sparkd is not running" in res.output


def test_sparkctl_status_with_a_broken_config_warns_and_uses_the_default_socket(
    tmp_path: Path,
) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[daemon]\ncontrol_sock = 1\n")
    res = CliRunner().invoke(cli, ["status", "--config", str(cfg)])
    assert "warning:" in res.output and "daemon.control_sock: unknown key" in res.output
    assert "/run/sparkd/control.sock" in res.output


def test_sparkctl_units_with_a_broken_config_exits_5(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.toml"
    cfg.write_text("[daemon]\ncontrol_sock = 1\n")
    res = CliRunner().invoke(cli, ["units", "--config", str(cfg)])
    assert res.exit_code == ExitStatus.CONFIG_INVALID
    assert "daemon.control_sock: unknown key" in res.output


def test_subscribe_streams_events_to_the_asyncio_client(server: ServerThread) -> None:
    async def collect() -> list[dict[str, Any]]:
        return [item async for item in aio_client.subscribe(server.path)]

    assert asyncio.run(collect()) == EVENTS
    assert asyncio.run(aio_client.call(server.path, "status")) == STATUS


def test_sparkctl_recover_without_a_desired_model_says_what_to_do(tmp_path: Path) -> None:
    asked: list[str] = []

    async def no_desired(request: Request) -> Any:
        asked.append(request.method)
        return {**STATUS, "desired_model": None, "active_model": None}

    with ServerThread(tmp_path / "control.sock", "sparkd-no-such-group", no_desired) as s:
        res = CliRunner().invoke(cli, ["recover", "--config", str(_config(tmp_path, s.path))])
    assert res.exit_code == ExitStatus.FAILURE
    assert "no desired model" in res.output and "sparkctl swap NAME" in res.output
    assert asked == ["status"]  # no swap was asked for


def test_sparkctl_recover_after_a_failed_start_names_the_model_and_its_failure(
    tmp_path: Path,
) -> None:
    """The default model's start failed with no last good model to roll back to (a first
    boot, a port held by another process): sparkd has no desired model although
    daemon.default_model is set. The message says so, not that the default is unset."""

    async def rolled_back_to_nothing(request: Request) -> Any:
        return {**STATUS, "desired_model": None, "active_model": None,
                "last_failure": {"model": "a", "reason": "health_gate: not healthy within "
                                 "30 s (/health: cannot connect: connection refused)"}}

    with ServerThread(tmp_path / "control.sock", "sparkd-no-such-group",
                      rolled_back_to_nothing) as s:
        res = CliRunner().invoke(cli, ["recover", "--config", str(_config(tmp_path, s.path))])
    assert res.exit_code == ExitStatus.FAILURE
    assert "default_model is unset" not in res.output
    assert "the last swap, to a, failed (health_gate: not healthy within 30 s" in res.output
    assert "sparkctl logs --model a" in res.output and "sparkctl swap a" in res.output


def test_sparkctl_swap_says_so_when_sparkd_closes_the_stream_mid_swap(tmp_path: Path) -> None:
    async def accepts(request: Request) -> Any:
        if request.method == "swap":
            return SwapReply(accepted=True, noop=False,
                             swap=sb.swap("a", id=7, step="preflight")).to_json()
        return STATUS

    # The server's subscribe stream ends after three events, none of them of swap 7.
    with ServerThread(tmp_path / "control.sock", "sparkd-no-such-group", accepts) as s:
        res = CliRunner().invoke(cli, ["swap", "a", "--config", str(_config(tmp_path, s.path))])
    assert res.exit_code == ExitStatus.DAEMON_UNREACHABLE, res.output
    assert "swap 7: nothing -> a accepted" in res.output
    assert "sparkd closed the event stream before swap 7 ended" in res.output


# Issue 10: the control socket holds against hostile clients.


def _wait_closed(sock: socket.socket, within_s: float) -> bytes:
    """Everything the server sends until it closes the connection (fails past within_s)."""
    sock.settimeout(within_s)
    buf = b""
    while True:
        chunk = sock.recv(65536)
        if not chunk:
            return buf
        buf += chunk


@pytest.mark.parametrize("payload", [
    b"[" * 60000 + b"\n",
    b'{"method": "status", "params": ' + b'{"a":' * 8000 + b"1" + b"}" * 8001 + b"\n",
])
def test_deeply_nested_json_gets_an_error_reply(server: ServerThread, payload: bytes) -> None:
    answer = raw(server.path, payload)
    assert answer["error"]["code"] == "bad-request"
    assert "nested" in answer["error"]["message"]
    assert call(server.path, "status") == STATUS


def test_a_request_line_longer_than_the_bound_is_refused(server: ServerThread) -> None:
    answer = raw(server.path, b'{"method": "status", "x": "' + b"a" * (MAX_REQUEST_LINE + 1))
    assert answer["error"] == {"code": "bad-request", "message": "request line too long "
                               f"(at most {MAX_REQUEST_LINE} bytes)"}


@pytest.fixture
def strict_server(tmp_path: Path) -> Iterator[ServerThread]:
    with ServerThread(tmp_path / "run" / "control.sock", group="sparkd-no-such-group",
                      idle_timeout_s=0.5) as s:
        yield s


@pytest.mark.parametrize("sent", [b"", b'{"method": "sta'])
def test_a_silent_or_slow_request_connection_is_closed(
    strict_server: ServerThread, sent: bytes
) -> None:
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(strict_server.path))
        s.sendall(sent)
        reply = _wait_closed(s, within_s=5)
    assert json.loads(reply)["error"] == {
        "code": "timeout", "message": "no complete request within 0.5 s"}


def test_a_subscribe_stream_outlives_the_idle_timeout(tmp_path: Path) -> None:
    async def slow(request: Request) -> AsyncIterator[Any]:
        for i in range(2):
            await asyncio.sleep(0.8)  # longer than the idle timeout between messages
            yield {"n": i}

    server = ServerThread(tmp_path / "s" / "control.sock", "sparkd-no-such-group",
                          idle_timeout_s=0.3)
    server.server = ControlServer(server.path, group="sparkd-no-such-group", handler=handler,
                                  streams={"subscribe": slow}, idle_timeout_s=0.3)

    async def collect() -> list[dict[str, Any]]:
        return [item async for item in aio_client.subscribe(server.path)]

    with server:
        assert asyncio.run(collect()) == [{"n": 0}, {"n": 1}]


def test_connections_past_the_limit_are_refused_at_once_and_the_socket_recovers(
    tmp_path: Path,
) -> None:
    # A long idle timeout: the held connections must still be held when the others come.
    with ServerThread(tmp_path / "run" / "control.sock", group="sparkd-no-such-group",
                      idle_timeout_s=60, max_connections=8) as server:
        held = [socket.socket(socket.AF_UNIX) for _ in range(8)]
        try:
            for s in held:
                s.connect(str(server.path))
            for _ in range(3):
                answer = raw(server.path, b'{"method": "status"}\n')
                assert answer["error"]["code"] == "busy"
                assert "8 connections" in answer["error"]["message"]
        finally:
            for s in held:
                s.close()
        # The held ones are gone: it serves again (once it has seen them close).
        tries = 100
        while tries and raw(server.path, b'{"method": "status"}\n').get("ok") is not True:
            tries -= 1
            threading.Event().wait(0.05)
        assert call(server.path, "status") == STATUS


def test_the_connection_limit_stays_below_the_descriptor_limit() -> None:
    assert connection_limit(256, soft_nofile=1024) == 256
    assert connection_limit(256, soft_nofile=300) == 300 - FD_HEADROOM
    assert connection_limit(256, soft_nofile=40) == 1


_EMFILE_SERVER = r"""
import asyncio, logging, os, resource, sys
from pathlib import Path
from sparkd.control.server import ControlServer

logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(name)s %(message)s")
resource.setrlimit(resource.RLIMIT_NOFILE, (128, 128))

async def handler(request):
    return "ok"

async def main():
    server = ControlServer(Path(sys.argv[1]), group="sparkd-no-such-group", handler=handler)
    await server.start()
    hog = []
    try:
        while True:
            hog.append(os.open("/dev/null", os.O_RDONLY))
    except OSError:
        pass
    print("READY", flush=True)
    await asyncio.sleep(float(sys.argv[2]))
    for fd in hog:
        os.close(fd)
    await asyncio.sleep(0.5)
    await server.close()

asyncio.run(main())
"""


def test_descriptor_exhaustion_does_not_storm_the_log(tmp_path: Path) -> None:
    # Issue 10: with every descriptor in use, each accept() fails; the old server logged a
    # traceback per try (79 MB in 30 s under 1,100 connections).
    import subprocess
    import sys

    sock = tmp_path / "run" / "control.sock"
    proc = subprocess.Popen([sys.executable, "-c", _EMFILE_SERVER, str(sock), "4"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"READY\n"
        clients = []
        for _ in range(50):
            c = socket.socket(socket.AF_UNIX)
            c.setblocking(False)  # noqa: FBT003
            with contextlib.suppress(BlockingIOError):
                c.connect(str(sock))
            clients.append(c)
        _out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        for c in locals().get("clients", []):
            c.close()
    assert proc.returncode == 0, err.decode()
    lines = err.decode().splitlines()
    assert len(err) < 2000, f"{len(err)} bytes of log in 4 s:\n" + "\n".join(lines[:20])
    assert any("cannot accept" in line and "descriptors" in line for line in lines), lines


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become another user")
def test_the_engine_user_is_refused_even_as_a_member_of_the_group() -> None:
    # nobody's primary group is nogroup: a member. As the engine user it is refused anyway.
    import grp
    import pwd

    group = grp.getgrgid(pwd.getpwnam("nobody").pw_gid).gr_name
    with tempfile.TemporaryDirectory(prefix="sparkd-peercred-") as d:
        os.chmod(d, 0o755)
        with ServerThread(Path(d) / "control.sock", group=group) as server:
            assert _ask_as_nobody(server.path) == "allowed"
        with ServerThread(Path(d) / "control.sock", group=group,
                          refuse_user="nobody") as server:
            answer = _ask_as_nobody(server.path)
    assert answer == "uid 65534 may not use sparkd: it is the engine user 'nobody' (code an "\
        "engine runs may not drive sparkd)"


def test_a_process_of_an_engine_unit_is_recognised_by_its_cgroup() -> None:
    assert engine_unit_of("0::/system.slice/sparkd-engine@sim-small.service\n") == (
        "sparkd-engine@sim-small.service")
    assert engine_unit_of(
        "12:pids:/system.slice/sparkd-engine@a:spec.service/x\n0::/system.slice/"
        "sparkd-engine@a:spec.service/x\n") == "sparkd-engine@a:spec.service"
    assert engine_unit_of("0::/system.slice/sparkd.service\n") is None
    assert engine_unit_of("0::/user.slice/user-0.slice/session-1.scope\n") is None
    assert engine_unit_of("0::/system.slice/sparkd-gateway.service\n") is None
