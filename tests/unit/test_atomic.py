"""Crash-safe writes: atomic replacement and the early-writeback hint."""

from __future__ import annotations

import os
from pathlib import Path

from sparkd.atomic import atomic_write, start_writeback


def test_atomic_write_replaces_whole_and_leaves_no_temp(tmp_path: Path) -> None:
    target = tmp_path / "state.json"
    atomic_write(target, b"old")
    atomic_write(target, b"new content", mode=0o600)
    assert target.read_bytes() == b"new content"
    assert target.stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_start_writeback_is_given_for_a_written_range(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "blob", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        os.pwrite(fd, b"x" * 65536, 0)
        assert start_writeback(fd, 0, 65536) is True
        assert start_writeback(fd, 0, 0) is False  # nothing to write back
    finally:
        os.close(fd)


def test_start_writeback_reports_a_refusal_instead_of_raising(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "blob", os.O_RDWR | os.O_CREAT, 0o644)
    os.close(fd)
    assert start_writeback(fd, 0, 4096) is False  # a closed fd: EBADF


def test_temp_files_of_writes_cut_short_are_removed_and_the_file_kept(tmp_path: Path) -> None:
    from sparkd.atomic import remove_stale_temps
    from sparkd.state import State, StateStore, render_state

    # What a power cut between the temp file's creation and the rename leaves: the state
    # whole, and a temp file of a process that no longer runs beside it.
    target = tmp_path / "state.toml"
    target.write_text(render_state(State(desired_model="a")))
    (tmp_path / ".state.toml.tmp-4242").write_bytes(b"desired_mo")
    (tmp_path / ".accepted.toml.tmp-4242").write_bytes(b"[daemon")
    own = tmp_path / f".state.toml.tmp-{os.getpid()}"  # this process's write in flight
    own.write_bytes(b"")
    state, warning = StateStore(tmp_path).load()
    assert (state.desired_model, warning) == ("a", None)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".accepted.toml.tmp-4242", own.name, "state.toml"]
    assert remove_stale_temps(tmp_path / "accepted.toml") == [
        tmp_path / ".accepted.toml.tmp-4242"]
    assert remove_stale_temps(tmp_path / "missing-dir" / "x.toml") == []
