"""The Supervisor against a fake systemd: adoption, start, reload, shutdown, status."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncGenerator
from pathlib import Path
from typing import Any

import pytest
from fakes import World, build, run, started

from sparkd.control.protocol import Request
from sparkd.control.status import Event
from sparkd.daemon.supervisor import DaemonState
from sparkd.errors import BadRequest, ConfigError
from sparkd.state import State, StateStore
from sparkd.systemd.manager import JobDone, UnitChanged

CONFIG = """
[daemon]
default_model = "a"
state_dir = "{state}"
[models.a]
engine = "sim"
port = 9001
[models.b]
engine = "sim"
port = 9002
"""

A = "sparkd-engine@a.service"


def world(tmp_path: Path, **kwargs: Any) -> World:
    return build(tmp_path, kwargs.pop("config_text", CONFIG), **kwargs)


def test_first_start_starts_the_default_model_and_reports_ready(tmp_path: Path) -> None:
    w = world(tmp_path)
    run(started(w.sup))
    assert w.systemd.calls == [("start", A)]
    assert w.applied[0][1] == 252
    assert "READY=1" in w.notes.sent
    assert w.sup.daemon_state is DaemonState.RUNNING
    # READY comes before the engine serves: sparkd answers sparkctl while a model loads.
    assert w.notes.sent.index("READY=1") < w.notes.sent.index("STATUS=a: serving, healthy")
    state, _ = StateStore(tmp_path / "state").load()
    assert state == State(desired_model="a", boot_id="boot-2", clean_shutdown=False,
                          last_swap_id=1)


def test_running_engine_is_adopted_not_restarted(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.systemd.set("a", "active", "running", pid=42, restarts=3)
    run(started(w.sup))
    assert w.systemd.calls == []
    engine = next(e for e in w.sup.status().engines if e.model == "a")
    assert (engine.main_pid, engine.n_restarts) == (42, 3)
    assert w.sup.active_model() == "a"


def test_an_adopted_engine_is_probed_before_sparkd_says_it_runs(tmp_path: Path) -> None:
    """The first status of a restarted sparkd (the one the gateway routes by) already says
    whether the engine it adopted is healthy: "health unknown" there made the gateway hold
    requests for an engine that served all along (the package upgrade test)."""
    w = world(tmp_path)
    w.systemd.set("a", "active", "running", pid=42)
    run(w.sup.start())  # not quiesced: no health check has run yet
    engine = next(e for e in w.sup.status().engines if e.model == "a")
    assert engine.health is not None and engine.health.ok is True
    assert "STATUS=a: serving, healthy" in w.notes.sent
    assert w.notes.sent.index("STATUS=a: serving, healthy") < w.notes.sent.index("READY=1")
    run(w.sup.quiesce())


def test_desired_model_from_state_wins_over_default(tmp_path: Path) -> None:
    StateStore(tmp_path / "state").save(State(desired_model="b", boot_id="boot-1",
                                              clean_shutdown=True))
    w = world(tmp_path)
    run(started(w.sup))
    assert w.systemd.calls == [("start", "sparkd-engine@b.service")]


def test_failed_unit_is_reset_before_start(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.systemd.set("a", "failed", "failed")
    run(started(w.sup))
    assert w.systemd.calls == [("reset-failed", A), ("start", A)]


def test_desired_model_that_fails_at_start_falls_back_to_the_last_good(tmp_path: Path) -> None:
    """After a power cut: the desired model does not come up, the last good one does."""
    StateStore(tmp_path / "state").save(State(desired_model="b", last_good_model="a",
                                              boot_id="boot-1"))
    w = world(tmp_path)
    w.systemd.fail_start = {"b"}
    run(started(w.sup))
    assert w.systemd.calls[-1] == ("start", A)
    assert w.sup.state.desired_model == "a"
    assert w.sup.state.last_failure_model == "b"


def test_corrupt_state_is_reported_and_default_used(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.toml").write_text("{{{")
    w = world(tmp_path)
    run(started(w.sup))
    assert w.sup.state_warning is not None and "kept it as" in w.sup.state_warning
    assert w.sup.status().daemon.state_warning == w.sup.state_warning
    assert w.systemd.calls == [("start", A)]


def test_health_and_status_line(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.systemd.set("a", "active", "running", pid=42)
    run(started(w.sup))
    run(w.sup.check_health())
    assert "STATUS=a: serving, healthy" in w.notes.sent
    status = w.sup.status()
    a = status.engines[0]
    assert a.health is not None and a.health.ok is True and a.health.status == 200
    assert status.memory.available_bytes == 12 << 30


def test_failing_health_counts_failures(tmp_path: Path) -> None:
    w = world(tmp_path, probe_status=503)
    w.systemd.set("a", "active", "running", pid=42)
    run(started(w.sup))
    run(w.sup.check_health())
    run(w.sup.check_health())
    assert w.notes.sent[-1] == "STATUS=a: serving, unhealthy (2 failed checks)"


def test_invalid_reload_keeps_the_old_config(tmp_path: Path) -> None:
    w = world(tmp_path)
    run(started(w.sup))
    old = w.sup.config
    w.sup.config.source.write_text("[models.a]\nengine = 'vllm'\nport = 'x'\n")
    with pytest.raises(ConfigError):
        run(w.sup.reload())
    assert w.sup.config is old
    assert len(w.applied) == 1
    assert w.notes.sent[-1].endswith("config reload failed, previous config kept")
    reload = w.sup.status().daemon.last_reload
    assert reload is not None and reload.ok is False


@pytest.mark.parametrize("word", ["--moe-backend", "--moe-backend=bogus"])
def test_a_reload_refuses_an_engine_line_the_real_parser_refuses(tmp_path: Path,
                                                                  word: str) -> None:
    """check-config refused `--moe-backend bogus` on vLLM 0.34 (not one of the choices of its
    recorded parser) while `systemctl reload sparkd` took it: the daemon's reload did not run
    the line check (found on the installed .deb). Now the reload is refused and the old config
    kept."""
    w = world(tmp_path)
    run(started(w.sup))
    old = w.sup.config
    args = f'["{word}", "bogus"]' if "=" not in word else f'["{word}"]'
    w.sup.config.source.write_text(
        w.sup.config.source.read_text() + '\n[models.moe]\nengine = "vllm"\n'
        f'engine_version = "0.34.0"\npath = "/srv/m"\nport = 8300\nargs = {args}\n')
    with pytest.raises(ConfigError, match=r"--moe-backend.*bogus.*not one of the choices"):
        run(w.sup.reload())
    assert w.sup.config is old
    assert len(w.applied) == 1


def test_valid_reload_reconciles_again(tmp_path: Path) -> None:
    w = world(tmp_path)
    run(started(w.sup))
    text = w.sup.config.source.read_text().replace("port = 9002", "port = 9003")
    w.sup.config.source.write_text(text)

    async def reload() -> dict[str, Any]:
        result = await w.sup.reload()
        await w.sup.quiesce()
        return result

    assert run(reload())["models"] == ["a", "b"]
    assert len(w.applied) == 2
    assert w.sup.config.models["b"].port == 9003


def test_shutdown_leaves_engines_and_marks_clean(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.systemd.set("a", "active", "running", pid=42)
    run(started(w.sup))
    run(w.sup.shutdown())
    assert w.systemd.calls == []
    assert "STOPPING=1" in w.notes.sent
    state, _ = StateStore(tmp_path / "state").load()
    assert state.clean_shutdown is True


def test_shutdown_can_stop_engines(tmp_path: Path) -> None:
    w = world(tmp_path, config_text=CONFIG.replace(
        'default_model = "a"', 'default_model = "a"\nstop_engines_on_exit = true'))
    w.systemd.set("a", "active", "running", pid=42)
    run(started(w.sup))
    run(w.sup.shutdown())
    assert w.systemd.calls == [("stop", A)]


def test_systemd_signals_refresh_the_unit(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.systemd.set("a", "activating", "start", pid=7)

    async def scenario() -> None:
        await started(w.sup)
        w.systemd.set("a", "active", "running", pid=7)
        w.sup.on_systemd_event(UnitChanged(A))
        w.sup.on_systemd_event(JobDone(1, A, "done"))
        w.sup.on_systemd_event(UnitChanged("other.service"))  # ignored
        await w.sup.quiesce()

    run(scenario())
    assert w.sup.engines["a"].unit.main_pid == 7
    assert w.sup.active_model() == "a"


def test_control_methods(tmp_path: Path) -> None:
    w = world(tmp_path)
    run(started(w.sup))
    assert run(w.sup.handle(Request("ping"))) == {"pong": True}
    assert run(w.sup.handle(Request("status")))["schema"] == 1
    assert run(w.sup.handle(Request("plan_swap", {"model": "b"})))["plan"][0] == "swap a -> b"
    with pytest.raises(BadRequest, match="unknown method 'nope'"):
        run(w.sup.handle(Request("nope")))
    with pytest.raises(BadRequest, match='swap needs "model"'):
        run(w.sup.handle(Request("swap", {"model": 3})))


def test_subscribers_get_a_snapshot_then_changes(tmp_path: Path) -> None:
    w = world(tmp_path)
    w.systemd.set("a", "activating", "start", pid=7)

    async def scenario() -> list[Event]:
        await started(w.sup)
        stream = w.sup.subscribe()
        assert isinstance(stream, AsyncGenerator)  # the event stream is one: it has aclose()
        got = [await anext(stream)]
        w.systemd.set("a", "active", "running", pid=7)
        await w.sup.refresh_units(["a"])
        got.append(await anext(stream))
        await w.sup.refresh_units(["a"])  # nothing changed: no event
        await w.sup.check_health()  # health turned ok: an event
        got.append(await anext(stream))
        await stream.aclose()
        return got

    snapshot, changed, healthy = asyncio.run(scenario())
    assert snapshot.event == "snapshot" and snapshot.status is not None
    assert snapshot.status.engines[0].active_state == "activating"
    assert changed.event == "changed" and changed.status is not None
    assert changed.status.engines[0].active_state == "active"
    assert healthy.status is not None and healthy.status.engines[0].healthy
    assert not w.sup.events.subscribers


def test_status_reports_the_gpu_and_where_memory_figures_come_from(tmp_path: Path) -> None:
    import json as _json

    from sparkd.monitor.nvml import FixtureNvml, NvmlSnapshot, read

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"
    w = world(tmp_path)

    def reader(name: str) -> Any:
        captured = _json.loads((fixtures / name).read_text())["captured"]

        async def read_gpu() -> NvmlSnapshot:
            return read(FixtureNvml(captured))

        return read_gpu

    w.sup.watch.read_gpu = reader("gb10-constructed.json")
    run(started(w.sup))
    status = w.sup.status()
    assert status.memory.accounting == (
        "unified: /proc/meminfo (NVML memory info not supported)")
    assert status.gpu is not None and status.gpu.gpus[0].name == "NVIDIA GB10"
    w.sup.watch.read_gpu = reader("h200.json")
    run(w.sup.check_health())
    assert (w.sup.status().memory.accounting or "").startswith("discrete: NVML")


def test_memory_pressure_is_reported_once_per_episode(tmp_path: Path, caplog: Any) -> None:
    from sparkd.monitor.psi import parse_psi

    fixtures = Path(__file__).resolve().parents[1] / "fixtures" / "psi"
    calm = {"memory": parse_psi((fixtures / "memory.txt").read_text())}
    thrash = {"memory": parse_psi((fixtures / "memory-thrashing.txt").read_text())}
    readings = iter([calm, calm, thrash, thrash, calm])
    w = world(tmp_path)
    w.sup.watch.read_pressure = lambda: next(readings)
    w.systemd.set("a", "active", "running", pid=42)
    run(started(w.sup))  # the first reading (calm): at start
    with caplog.at_level("WARNING"):
        for _ in range(4):
            run(w.sup.check_health())
    warnings = [r.getMessage() for r in caplog.records if "memory pressure" in r.getMessage()]
    assert warnings == ["memory pressure: every task stalled 28.5 % of the last 10 s (limit "
                        "10 %) while a serves; the desktop is starving"]
    assert w.sup.status().pressure["memory"].full_avg10 == 0.0


def test_a_restart_by_systemd_says_why_the_run_before_ended(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """"systemd restarted a (restart 4, success)" after every crash: Result= after the
    restart is the new run's (issue 12's second review). The reading before says why."""
    w = world(tmp_path)
    w.systemd.set("a", "active", "running", pid=7)

    async def scenario() -> None:
        await started(w.sup)
        w.systemd.set("a", "activating", "auto-restart", restarts=0, result="exit-code")
        await w.sup.refresh_units(["a"])
        w.systemd.set("a", "active", "running", pid=8, restarts=1, result="success")
        await w.sup.refresh_units(["a"])
        w.systemd.set("a", "active", "running", pid=9, restarts=2, result="success")
        await w.sup.refresh_units(["a"])  # the crash between two readings: no reason seen

    with caplog.at_level(logging.WARNING):
        run(scenario())
    said = [r.getMessage() for r in caplog.records if "systemd restarted" in r.getMessage()]
    assert said == ["systemd restarted a (restart 1; the run before ended: exit-code)",
                    "systemd restarted a (restart 2)"]
