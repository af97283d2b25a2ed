"""The daemon's health loop (sparkd.daemon.application.Daemon._health_loop) over the real
Supervisor and a fake systemd: a tick that fails in a way nobody foresaw is said with its
traceback and the next tick runs; the loop never dies quietly while the watchdog goes on."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

import pytest
from fakes import Notes, build, run, started

from sparkd.daemon import application
from sparkd.daemon.application import Daemon

CONFIG = """
[daemon]
default_model = "a"
state_dir = "{state}"
health_interval_s = 0.1
[models.a]
engine = "sim"
port = 9001
"""


class Signals:
    def drain(self) -> None:
        pass


def test_an_unforeseen_failure_in_a_tick_is_said_and_the_next_tick_runs(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Only SparkdError was caught: any other exception (an NVML binding's, a parser's) ended
    # the health loop's task for good: no more health checks, hung-engine restarts, liveness
    # or desktop ladder, while the systemd watchdog kept being fed (a false "ok").
    # sdnotify leaks its socket where NOTIFY_SOCKET is unset: the recording notifier instead
    monkeypatch.setattr(application, "SdNotifier", Notes)
    w = build(tmp_path, CONFIG)
    w.systemd.set("a", "active", "running", pid=41)
    ticks = 0
    real = w.sup.check_health

    async def flaky() -> None:
        nonlocal ticks
        ticks += 1
        if ticks == 1:
            raise RuntimeError("a reading nobody expected")
        await real()

    async def scenario() -> bool:
        await started(w.sup)
        w.sup.check_health = flaky  # type: ignore[method-assign]
        daemon = Daemon(w.sup.config, config_file=tmp_path / "sparkd.toml")
        task = asyncio.create_task(daemon._health_loop(w.sup, Signals()))  # type: ignore[arg-type]
        try:
            for _ in range(100):
                await asyncio.sleep(0.05)
                if ticks >= 3 or task.done():
                    break
            return task.done()
        finally:
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await w.sup.quiesce()

    with caplog.at_level(logging.ERROR):
        died = run(scenario())
    assert not died
    assert ticks >= 3
    (said,) = [r for r in caplog.records if "health tick failed" in r.getMessage()]
    assert said.exc_info is not None and "a reading nobody expected" in str(said.exc_info[1])
