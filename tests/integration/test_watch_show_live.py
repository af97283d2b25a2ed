"""Issue 13 item 6 for real: the daemon's Prometheus endpoint scraped over HTTP and read with
prometheus_client's parser, and `sparkctl top` (a real process) against the real control
socket, both serving the real Supervisor (over a fake systemd)."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import aiohttp
import pytest
from conftest import free_port
from fakes import World, build, started
from prometheus_client import CONTENT_TYPE_LATEST
from prometheus_client.parser import text_string_to_metric_families

from sparkd.control.server import ControlServer
from sparkd.ctl.exits import ExitStatus
from sparkd.daemon.metrics import MetricsServer, follow
from sparkd.monitor.floor import GIB

CONFIG = """
[daemon]
default_model = "a"
state_dir = "{state}"
[models.a]
engine = "sim"
port = 9001
"""
SPARKCTL = [sys.executable, "-c", "from sparkd.ctl.main import main; main()"]


async def scrape(url: str) -> tuple[str, dict[tuple[str, tuple[tuple[str, str], ...]], float]]:
    async with aiohttp.ClientSession() as session, session.get(url) as response:
        assert response.status == 200
        content_type = response.headers["Content-Type"]
        text = await response.text()
    return content_type, {(s.name, tuple(sorted(s.labels.items()))): s.value
                          for f in text_string_to_metric_families(text) for s in f.samples}


def test_the_metrics_endpoint_serves_the_daemons_status(tmp_path: Path) -> None:
    w = build(tmp_path, CONFIG)
    w.systemd.set("a", "active", "running", pid=41)
    w.sup.watch.engine_memory = {41: 5 * GIB}.get
    port = free_port()

    async def scenario() -> None:
        await started(w.sup)
        server = MetricsServer(f"127.0.0.1:{port}", w.sup.status)
        assert await server.start()
        try:
            content_type, m = await scrape(f"http://127.0.0.1:{port}/metrics")
            assert content_type == CONTENT_TYPE_LATEST  # the text format the parser reads
            assert m[("sparkd_memory_available_bytes", ())] == 12 * GIB  # fakes' meminfo
            assert m[("sparkd_memory_floor_bytes", ())] == 4 * GIB
            assert m[("sparkd_engine_memory_bytes", (("engine", "a"),))] == 5 * GIB
            assert m[("sparkd_engine_state", (("model", "a"), ("state", "active"),
                                              ("variant", "plain")))] == 1
            assert m[("sparkd_swaps_total", (("result", "done"),))] == 0  # adopted, no swap
            # A watch action shows at the next scrape: nothing is cached between scrapes.
            w.sup.watch.actions.record("liveness_restart", "a", 0.0, "restarted")
            _, m = await scrape(f"http://127.0.0.1:{port}/metrics")
            assert m[("sparkd_watch_actions_total", (("kind", "liveness_restart"),))] == 1
        finally:
            await server.close()
        # Closed: nothing listens any more.
        with pytest.raises(aiohttp.ClientConnectionError):
            await scrape(f"http://127.0.0.1:{port}/metrics")

    asyncio.run(scenario())


def test_a_taken_address_is_an_event_not_a_failure(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    w = build(tmp_path, CONFIG)
    port = free_port()

    async def scenario() -> None:
        first = MetricsServer(f"127.0.0.1:{port}", w.sup.status)
        second = MetricsServer(f"127.0.0.1:{port}", w.sup.status)
        assert await first.start()
        try:
            assert not await second.start()
        finally:
            await second.close()
            await first.close()

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records if "metrics endpoint" in r.getMessage()]
    assert len(said) == 1
    assert said[0].startswith(f"the metrics endpoint cannot listen on 127.0.0.1:{port} "
                              "(daemon.metrics_listen): ")


class DaemonThread:
    """The real Supervisor behind the real ControlServer, on a loop of its own."""

    def __init__(self, w: World, path: Path) -> None:
        self.w = w
        self.path = path
        self.loop = asyncio.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        server = ControlServer(self.path, group="sparkd-no-such-group",
                               handler=self.w.sup.handle, streams={})
        self.loop.run_until_complete(started(self.w.sup))
        self.loop.run_until_complete(server.start())
        self.ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(server.close())
        self.loop.run_until_complete(self.w.sup.quiesce())
        self.loop.close()

    def start(self) -> DaemonThread:
        self.thread.start()
        assert self.ready.wait(10)
        return self

    def stop(self) -> None:
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)


def daemon(tmp_path: Path) -> tuple[DaemonThread, Path]:
    sock = tmp_path / "run" / "control.sock"
    w = build(tmp_path, CONFIG)
    w.systemd.set("a", "active", "running", pid=41)
    w.sup.watch.actions.record("memory_floor_stop", "b", time.time() - 5, "stopped: test")
    cfg = tmp_path / "ctl.toml"
    cfg.write_text(f'[daemon]\ncontrol_socket = "{sock}"\n')
    return DaemonThread(w, sock).start(), cfg


def test_top_refreshes_the_status_and_stops_after_count(tmp_path: Path) -> None:
    d, cfg = daemon(tmp_path)
    try:
        out = subprocess.run([*SPARKCTL, "top", "--config", str(cfg), "--count", "3",
                              "--interval", "0.1"], capture_output=True, text=True,
                             timeout=60, check=False, env={**os.environ, "COLUMNS": "160"})
    finally:
        d.stop()
    assert out.returncode == 0, out.stderr
    # Not a terminal: one frame after the other, each opening with the daemon's line.
    frames = out.stdout.split("\nsparkd ")
    assert len(frames) == 3, out.stdout
    assert frames[0].startswith("sparkd ")
    for f in frames:
        assert "a: serving, healthy" in f
        assert "12.0 GiB available of 16.0 GiB" in f
        assert "| floor 4.0 GiB" in f
        assert "memory_floor_stop b: stopped: test" in f


def wait_for(proc: subprocess.Popen[str], text: str, within_s: float = 30) -> str:
    """Read the process's stdout until `text` shows."""
    assert proc.stdout is not None
    seen = ""
    deadline = time.monotonic() + within_s
    while text not in seen:
        assert time.monotonic() < deadline, seen
        line = proc.stdout.readline()
        assert line, seen
        seen += line
    return seen


def test_top_says_so_and_exits_3_when_the_daemon_goes_away(tmp_path: Path) -> None:
    d, cfg = daemon(tmp_path)
    proc = subprocess.Popen([*SPARKCTL, "top", "--config", str(cfg), "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(proc, "a: serving, healthy")
        d.stop()
        _, err = proc.communicate(timeout=30)
    finally:
        d.stop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == int(ExitStatus.DAEMON_UNREACHABLE) == 3
    assert err.startswith("sparkctl: sparkd went away: sparkd is not running"), err


def test_top_leaves_quietly_on_ctrl_c(tmp_path: Path) -> None:
    d, cfg = daemon(tmp_path)
    proc = subprocess.Popen([*SPARKCTL, "top", "--config", str(cfg), "--interval", "0.2"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(proc, "a: serving, healthy")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=30)
    finally:
        d.stop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0
    assert "Traceback" not in err and "Aborted" not in err, err


def test_top_without_a_daemon_exits_3(tmp_path: Path) -> None:
    cfg = tmp_path / "ctl.toml"
    cfg.write_text(f'[daemon]\ncontrol_socket = "{tmp_path / "none.sock"}"\n')
    out = subprocess.run([*SPARKCTL, "top", "--config", str(cfg), "--count", "1"],
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 3
    assert out.stderr.startswith("sparkctl: sparkd is not running"), out.stderr


def test_a_reloaded_address_moves_the_endpoint(tmp_path: Path) -> None:
    """What the daemon does when a reload changes daemon.metrics_listen: the same address
    keeps the running endpoint, another one moves it, "" closes it."""
    w = build(tmp_path, CONFIG)
    a, b = f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"

    async def scenario() -> None:
        first = await follow(None, a, w.sup.status)
        assert first is not None
        assert await follow(first, a, w.sup.status) is first
        second = await follow(first, b, w.sup.status)
        assert second is not None and second is not first
        await scrape(f"http://{b}/metrics")
        with pytest.raises(aiohttp.ClientConnectionError):
            await scrape(f"http://{a}/metrics")
        assert await follow(second, "", w.sup.status) is None
        with pytest.raises(aiohttp.ClientConnectionError):
            await scrape(f"http://{b}/metrics")

    asyncio.run(scenario())
