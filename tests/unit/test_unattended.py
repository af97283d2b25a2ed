"""Unattended means true (issue 12), at the Supervisor over fake systemd: the accepted config,
a state write that fails, engines a reload no longer describes, lost state, swap numbers."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import pytest
from fakes import World, build, run, started

from sparkd.accepted import load_or_fall_back
from sparkd.engine.plan import SwapStep
from sparkd.errors import ConfigError, StateError, VerificationFailed
from sparkd.state import State, StateStore
from sparkd.store.preflight import preflight_verify_async

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


def world(tmp_path: Path, text: str = CONFIG, **kwargs: Any) -> World:
    return build(tmp_path, text, **kwargs)


def unit(model: str) -> str:
    return f"sparkd-engine@{model}.service"


def test_start_keeps_the_config_as_accepted_and_prestart_reads_that(tmp_path: Path) -> None:
    w = world(tmp_path)
    run(started(w.sup))
    accepted = tmp_path / "state" / "accepted.toml"
    assert accepted.read_text() == (tmp_path / "sparkd.toml").read_text()
    assert w.sup.config.daemon.accepted_config == accepted


def test_a_refused_file_at_start_runs_on_the_accepted_copy(tmp_path: Path) -> None:
    w = world(tmp_path)
    run(started(w.sup))
    cfg = tmp_path / "sparkd.toml"
    cfg.write_text(cfg.read_text().replace("default_model", "default_modle"))
    loaded = load_or_fall_back(cfg, state_dir=tmp_path / "state")
    assert loaded.refused is not None and "default_modle" in loaded.refused
    assert loaded.config.source == tmp_path / "state" / "accepted.toml"
    assert loaded.config.daemon.default_model == "a"


def test_no_accepted_copy_and_a_refused_file_fails_with_the_fix(tmp_path: Path) -> None:
    cfg = tmp_path / "sparkd.toml"
    cfg.write_text("[daemon]\ndefault_modle = 1\n")
    with pytest.raises(ConfigError) as err:
        load_or_fall_back(cfg, state_dir=tmp_path / "state")
    assert "default_modle" in err.value.message
    assert "systemctl reset-failed sparkd; systemctl start sparkd" in err.value.message


def test_a_reload_whose_copy_cannot_be_kept_is_refused(tmp_path: Path) -> None:
    w = world(tmp_path)
    run(started(w.sup))

    def full(config: object) -> None:
        raise ConfigError("cannot keep the accepted config at X: [Errno 28] No space left")

    w.sup.deps.accept_config = full
    with pytest.raises(ConfigError, match="No space left"):
        run(w.sup.reload())
    status = w.sup.status().daemon
    assert status.last_reload is not None and not status.last_reload.ok


def test_a_flip_that_cannot_be_saved_fails_the_swap_and_rolls_back(tmp_path: Path) -> None:
    w = world(tmp_path)
    run(started(w.sup))
    store = StateStore(tmp_path / "state")
    real_save = store.save

    def no_space(state: State) -> None:
        raise StateError(f"cannot write {store.path}: [Errno 28] No space left on device")

    w.sup.deps.store.save = no_space  # type: ignore[method-assign]

    async def scenario() -> Any:
        swap = w.sup.request_swap("b")
        await w.sup.quiesce()
        return swap

    swap = run(scenario())
    assert swap is not None and swap.step is SwapStep.ROLLED_BACK
    assert swap.failure is not None and swap.failure.startswith("flip: nothing flipped")
    assert "No space left" in swap.failure
    assert w.sup.state.desired_model == "a"
    assert w.sup.status().daemon.state_unsaved is not None
    assert "state not saved" in w.sup.status_line()
    on_disk, _ = StateStore(tmp_path / "state").load()
    assert on_disk.desired_model == "a"
    # The disk has room again: the next health tick saves, and the condition clears.
    w.sup.deps.store.save = real_save  # type: ignore[method-assign]
    run(w.sup.check_health())
    assert w.sup.state_unsaved is None


@pytest.mark.parametrize(("edit", "why"), [
    (lambda text: text.split("[models.b]")[0], "model b is no longer configured"),
    (lambda text: text.replace("port = 9002", "port = 9012"), "port moved from 9002 to 9012"),
])
def test_a_reload_stops_a_running_engine_it_no_longer_describes(
    tmp_path: Path, edit: Any, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    w = world(tmp_path)

    async def scenario() -> None:
        await started(w.sup)
        w.sup.request_swap("b")
        await w.sup.quiesce()
        cfg = tmp_path / "sparkd.toml"
        cfg.write_text(edit(cfg.read_text()))
        w.systemd.calls.clear()
        await w.sup.reload()
        await w.sup.quiesce()

    run(scenario())
    assert w.systemd.calls[0] == ("stop", unit("b"))
    assert why in caplog.text
    serving = "b" if "port" in why else "a"
    assert w.sup.active_model() == serving
    assert ("start", unit(serving)) in w.systemd.calls


@pytest.mark.parametrize("text", ["desired_model = [[[", ""])
def test_lost_state_adopts_the_running_engine(tmp_path: Path, text: str) -> None:
    (tmp_path / "state").mkdir()
    (tmp_path / "state" / "state.toml").write_text(text)
    w = world(tmp_path)
    w.systemd.set("b", "active", "running", pid=42)
    run(started(w.sup))
    assert w.systemd.calls == []  # b was adopted: nothing stopped, nothing started
    assert w.sup.state.desired_model == "b"
    assert w.sup.state_warning is not None
    assert StateStore(tmp_path / "state").load()[0].desired_model == "b"


def test_swap_numbers_go_on_across_restarts(tmp_path: Path) -> None:
    w = world(tmp_path)

    async def swaps(sup: Any) -> list[int]:
        await started(sup)
        ids = [sup.last_swap.id]
        sup.request_swap("b")
        await sup.quiesce()
        ids.append(sup.last_swap.id)
        await sup.shutdown()
        return ids

    first = run(swaps(w.sup))
    again = world(tmp_path)
    again.systemd.units = dict(w.systemd.units)

    async def one_more() -> int:
        await started(again.sup)
        again.sup.request_swap("a")
        await again.sup.quiesce()
        assert again.sup.last_swap is not None
        await again.sup.shutdown()
        return again.sup.last_swap.id

    assert first == [1, 2]
    assert run(one_more()) == 3


def test_a_hung_engine_whose_restart_fails_is_said_to_have_failed(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    text = CONFIG.replace('default_model = "a"', 'default_model = "a"\nhung_after_failures = 1')
    w = world(tmp_path, text, probe_status=503)
    w.systemd.set("a", "active", "running", pid=7)
    w.systemd.restart_unit = lambda name: w.systemd._job(name, "failed")  # type: ignore[method-assign]

    async def scenario() -> None:
        await w.sup.start()
        await w.sup.check_health()
        await w.sup.quiesce()

    asyncio.run(scenario())
    assert "the restart after the hang failed (job failed)" in caplog.text


def test_a_desired_model_refused_at_boot_falls_back_to_the_last_good(tmp_path: Path) -> None:
    """After a power cut the desired model's files are damaged: its preflight refuses it, and
    the last good model serves instead of nothing."""
    StateStore(tmp_path / "state").save(State(desired_model="b", last_good_model="a",
                                              boot_id="boot-1"))
    w = world(tmp_path)

    async def damaged(config: Any, model: Any) -> Any:
        if model.name == "b":
            raise VerificationFailed("model b: 1 file(s) failed verification: x: BAD")
        return await preflight_verify_async(config, model)

    w.sup.deps.verify_files = damaged
    run(started(w.sup))
    assert w.systemd.calls == [("start", unit("a"))]
    assert w.sup.state.desired_model == "a"
    assert w.sup.state.last_failure_model == "b"
    assert w.sup.last_swap is not None and w.sup.last_swap.plan.target == "a"


def test_after_an_unclean_shutdown_files_are_checked_and_repaired_from_their_source(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    StateStore(tmp_path / "state").save(State(desired_model="a", boot_id="boot-1",
                                              clean_shutdown=False))
    text = CONFIG.replace('[models.a]\nengine = "sim"',
                          '[models.a]\nengine = "sim"\nsource = "hf://org/a"')
    w = world(tmp_path, text)
    asked: list[tuple[str, bool]] = []

    async def verify(config: Any, model: Any) -> Any:
        asked.append((model.name, model.repair))
        return await preflight_verify_async(config, model)

    w.sup.deps.verify_files = verify
    caplog.set_level(logging.INFO)
    run(started(w.sup))
    assert asked == [("a", True)]  # repair = false in the config; the unclean boot repairs
    assert "after the unclean shutdown: a's files checked (and repaired from its source" in (
        caplog.text)


@pytest.mark.parametrize(("edit", "why"), [
    (lambda text: text.split("[models.b]")[0], "model b is no longer configured"),
    (lambda text: text.replace("port = 9002", "port = 9012"), "port moved from 9002 to 9012"),
])
def test_a_restart_stops_a_running_engine_the_new_config_no_longer_describes(
    tmp_path: Path, edit: Any, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The same edits as above, put in force by `systemctl restart sparkd` (or any start
    while the engines run, stop_engines_on_exit = false) instead of a reload: the engine the
    accepted config started is stopped first, never left running orphaned (its unit file
    gone, `not-found active`, its memory and port held) nor probed on its new port and
    restarted as hung."""
    w = world(tmp_path)

    async def first() -> None:
        await started(w.sup)
        w.sup.request_swap("b")
        await w.sup.quiesce()
        await w.sup.shutdown()

    run(first())
    assert w.systemd.units[unit("b")].running
    again = world(tmp_path, edit(CONFIG))
    again.systemd.units = dict(w.systemd.units)
    run(started(again.sup))
    assert again.systemd.calls[0] == ("stop", unit("b"))
    assert why in caplog.text
    # The stop job's end reached the start (not the wait's timeout: b is not an engine of
    # the new config, and the start has not made the new config's engines yet).
    assert "stop job done" in caplog.text
    serving = "b" if "port" in why else "a"
    assert again.sup.active_model() == serving
    assert ("start", unit(serving)) in again.systemd.calls
