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
