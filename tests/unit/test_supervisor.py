"""The Supervisor against a fake systemd: adoption, start, reload, shutdown, status."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

import pytest

from sparkd.config import Config, parse_config
from sparkd.control.protocol import Request
from sparkd.engine.health import ProbeResult
from sparkd.errors import BadRequest, ConfigError
from sparkd.monitor.memory import MemInfo
from sparkd.state import State, StateStore
from sparkd.supervisor import DaemonState, Deps, Supervisor
from sparkd.systemd.manager import JobDone, SystemdManager, UnitChanged, UnitStatus

T = TypeVar("T")

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


class FakeManager:
    def __init__(self) -> None:
        self.units: dict[str, UnitStatus] = {}
        self.calls: list[tuple[str, str]] = []
        self.reloads = 0

    def set(self, name: str, active: str, sub: str, pid: int = 0, restarts: int = 0) -> None:
        self.units[name] = UnitStatus(name, "loaded", active, sub, pid, restarts)

    def version(self) -> int:
        return 255

    def daemon_reload(self) -> None:
        self.reloads += 1

    def start_unit(self, name: str) -> str:
        self.calls.append(("start", name))
        self.set(name, "activating", "start", pid=100)
        return "/org/freedesktop/systemd1/job/1"

    def stop_unit(self, name: str) -> str:
        self.calls.append(("stop", name))
        self.set(name, "inactive", "dead")
        return "/org/freedesktop/systemd1/job/2"

    def restart_unit(self, name: str) -> str:
        self.calls.append(("restart", name))
        return "/org/freedesktop/systemd1/job/3"

    def reset_failed_unit(self, name: str) -> None:
        self.calls.append(("reset-failed", name))

    def unit_status(self, name: str) -> UnitStatus:
        return self.units.get(name, UnitStatus(name, "loaded"))


class Notes:
    def __init__(self) -> None:
        self.sent: list[str] = []

    def notify(self, state: str) -> None:
        self.sent.append(state)


def make(
    tmp_path: Path, manager: FakeManager, *, probe_status: int = 200, config_text: str = CONFIG
) -> tuple[Supervisor, Notes, list[tuple[Config, int]]]:
    cfg_path = tmp_path / "sparkd.toml"
    cfg_path.write_text(config_text.format(state=tmp_path / "state"))
    config = parse_config(cfg_path.read_text(), source=cfg_path)
    applied: list[tuple[Config, int]] = []

    def apply_units(c: Config, version: int, reload: Callable[[], None]) -> Mapping[str, Any]:
        applied.append((c, version))
        reload()
        return {"changed": True, "written": [m.unit_name for m in c.supervised_models]}

    async def systemd(fn: Callable[[SystemdManager], T]) -> T:
        return fn(manager)

    async def probe(url: str) -> ProbeResult:
        return ProbeResult(url=url, status=probe_status, error=None, latency_s=0.001)

    async def journal_since(unit: str, since: float) -> list[str]:
        return []

    async def models_listed(url: str, model: str) -> bool:
        return True

    notes = Notes()
    deps = Deps(
        systemd=systemd,
        apply_units=apply_units,
        store=StateStore(tmp_path / "state"),
        notifier=notes,
        probe=probe,
        meminfo=lambda: MemInfo(total=8 << 30, free=1 << 30, available=6 << 30, cached=1 << 30),
        boot_id="boot-2",
        journal_since=journal_since,
        models_listed=models_listed,
    )
    return Supervisor(config, deps), notes, applied


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_first_start_starts_the_default_model_and_reports_ready(tmp_path: Path) -> None:
    m = FakeManager()
    sup, notes, applied = make(tmp_path, m)
    run(sup.start())
    assert m.calls == [("start", "sparkd-engine@a.service")]
    assert applied[0][1] == 255
    assert "READY=1" in notes.sent
    assert sup.daemon_state is DaemonState.RUNNING
    assert "STATUS=a: activating (start)" in notes.sent
    state, _ = StateStore(tmp_path / "state").load()
    assert state == State(desired_model="a", boot_id="boot-2", clean_shutdown=False)


def test_running_engine_is_adopted_not_restarted(tmp_path: Path) -> None:
    m = FakeManager()
    m.set("sparkd-engine@a.service", "active", "running", pid=42, restarts=3)
    sup, _, _ = make(tmp_path, m)
    run(sup.start())
    assert m.calls == []
    engine = next(e for e in sup.status()["engines"] if e["model"] == "a")
    assert (engine["main_pid"], engine["n_restarts"]) == (42, 3)
    assert sup.active_model() == "a"


def test_desired_model_from_state_wins_over_default(tmp_path: Path) -> None:
    StateStore(tmp_path / "state").save(State(desired_model="b", boot_id="boot-1",
                                              clean_shutdown=True))
    m = FakeManager()
    sup, _, _ = make(tmp_path, m)
    run(sup.start())
    assert m.calls == [("start", "sparkd-engine@b.service")]


def test_failed_unit_is_reset_before_start(tmp_path: Path) -> None:
    m = FakeManager()
    m.set("sparkd-engine@a.service", "failed", "failed")
    sup, _, _ = make(tmp_path, m)
    run(sup.start())
    assert m.calls == [("reset-failed", "sparkd-engine@a.service"),
                       ("start", "sparkd-engine@a.service")]


def test_corrupt_state_is_reported_and_default_used(tmp_path: Path) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.toml").write_text("{{{")
    m = FakeManager()
    sup, _, _ = make(tmp_path, m)
    run(sup.start())
    assert sup.state_warning is not None and "kept it as" in sup.state_warning
    assert sup.status()["daemon"]["state_warning"] == sup.state_warning
    assert m.calls == [("start", "sparkd-engine@a.service")]


def test_health_and_status_line(tmp_path: Path) -> None:
    m = FakeManager()
    m.set("sparkd-engine@a.service", "active", "running", pid=42)
    sup, notes, _ = make(tmp_path, m)
    run(sup.start())
    run(sup.check_health())
    assert notes.sent[-1] == "STATUS=a: serving, healthy"
    status = sup.status()
    a = status["engines"][0]
    assert a["health"]["ok"] is True and a["health"]["status"] == 200
    assert status["memory"]["available_bytes"] == 6 << 30


def test_failing_health_counts_failures(tmp_path: Path) -> None:
    m = FakeManager()
    m.set("sparkd-engine@a.service", "active", "running", pid=42)
    sup, notes, _ = make(tmp_path, m, probe_status=503)
    run(sup.start())
    run(sup.check_health())
    run(sup.check_health())
    assert notes.sent[-1] == "STATUS=a: serving, unhealthy (2 failed checks)"


def test_invalid_reload_keeps_the_old_config(tmp_path: Path) -> None:
    m = FakeManager()
    sup, notes, applied = make(tmp_path, m)
    run(sup.start())
    old = sup.config
    sup.config.source.write_text("[models.a]\nengine = 'vllm'\nport = 'x'\n")
    with pytest.raises(ConfigError):
        run(sup.reload())
    assert sup.config is old
    assert len(applied) == 1
    assert notes.sent[-1].endswith("config reload failed, previous config kept")
    assert sup.status()["daemon"]["last_reload"]["ok"] is False


def test_valid_reload_reconciles_again(tmp_path: Path) -> None:
    m = FakeManager()
    sup, _, applied = make(tmp_path, m)
    run(sup.start())
    text = sup.config.source.read_text().replace("port = 9002", "port = 9003")
    sup.config.source.write_text(text)
    result = run(sup.reload())
    assert result["models"] == ["a", "b"]
    assert len(applied) == 2
    assert sup.config.models["b"].port == 9003


def test_shutdown_leaves_engines_and_marks_clean(tmp_path: Path) -> None:
    m = FakeManager()
    m.set("sparkd-engine@a.service", "active", "running", pid=42)
    sup, notes, _ = make(tmp_path, m)
    run(sup.start())
    run(sup.shutdown())
    assert m.calls == []
    assert "STOPPING=1" in notes.sent
    state, _ = StateStore(tmp_path / "state").load()
    assert state.clean_shutdown is True


def test_shutdown_can_stop_engines(tmp_path: Path) -> None:
    m = FakeManager()
    m.set("sparkd-engine@a.service", "active", "running", pid=42)
    text = CONFIG.replace('default_model = "a"', 'default_model = "a"\nstop_engines_on_exit = true')
    sup, _, _ = make(tmp_path, m, config_text=text)
    run(sup.start())
    run(sup.shutdown())
    assert m.calls == [("stop", "sparkd-engine@a.service")]


def test_systemd_signals_refresh_the_unit(tmp_path: Path) -> None:
    m = FakeManager()
    sup, _, _ = make(tmp_path, m)

    async def scenario() -> None:
        await sup.start()
        m.set("sparkd-engine@a.service", "active", "running", pid=7)
        sup.on_systemd_event(UnitChanged("sparkd-engine@a.service"))
        sup.on_systemd_event(JobDone(1, "sparkd-engine@a.service", "done"))
        sup.on_systemd_event(UnitChanged("other.service"))  # ignored
        assert sup._refresh_task is not None
        await sup._refresh_task

    run(scenario())
    assert sup.engines["a"].unit.main_pid == 7
    assert sup.active_model() == "a"


def test_control_methods(tmp_path: Path) -> None:
    sup, _, _ = make(tmp_path, FakeManager())
    run(sup.start())
    assert run(sup.handle(Request("ping"))) == {"pong": True}
    assert run(sup.handle(Request("status")))["schema"] == 1
    with pytest.raises(BadRequest, match="unknown method 'nope'"):
        run(sup.handle(Request("nope")))


def test_subscribers_get_a_snapshot_then_changes(tmp_path: Path) -> None:
    m = FakeManager()
    sup, _, _ = make(tmp_path, m)

    async def scenario() -> list[dict[str, Any]]:
        await sup.start()
        stream = sup.subscribe()
        got = [await anext(stream)]
        m.set("sparkd-engine@a.service", "active", "running", pid=7)
        await sup.refresh_units(["a"])
        got.append(await anext(stream))
        await sup.refresh_units(["a"])  # nothing changed: no event
        await sup.check_health()  # health turned ok: an event
        got.append(await anext(stream))
        await stream.aclose()
        return got

    snapshot, changed, healthy = run(scenario())
    assert snapshot["event"] == "snapshot"
    assert snapshot["status"]["engines"][0]["active_state"] == "activating"
    assert changed["event"] == "changed"
    assert changed["status"]["engines"][0]["main_pid"] == 7
    assert healthy["status"]["engines"][0]["health"]["ok"] is True
    assert not sup._subscribers
