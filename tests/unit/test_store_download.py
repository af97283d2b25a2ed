"""The download sink: bytes land on disk as a contiguous prefix of what was received."""

from __future__ import annotations

import hashlib
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from sparkd.store.download import _Gap, _Sink
from sparkd.store.manifest import FileEntry

N = 64 * 1024


def sink_for(tmp_path: Path, data: bytes) -> _Sink:
    fd = os.open(tmp_path / "f.part", os.O_RDWR | os.O_CREAT, 0o644)
    entry = FileEntry("f", len(data), "sha256", hashlib.sha256(data).hexdigest())
    return _Sink(fd, entry)


def test_batches_are_written_and_hashed_in_order(tmp_path: Path) -> None:
    data = os.urandom(8 * N)
    sink = sink_for(tmp_path, data)
    try:
        futures = [sink.submit([data[i : i + N // 2], data[i + N // 2 : i + N]])
                   for i in range(0, len(data), N)]
        assert [f.result() for f in futures] == [N] * 8
        assert sink.pos == sink.submitted == len(data) and not sink.broken
        assert sink.hasher.hexdigest() == sink.entry.digest
        assert (tmp_path / "f.part").read_bytes() == data
    finally:
        sink.close()
        os.close(sink.fd)


def test_a_batch_taken_back_off_the_queue_stops_every_later_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancellation can take a queued batch back (asyncio.wrap_future cancels it): the
    batches after it are refused rather than written past a hole."""
    data = os.urandom(3 * N)
    sink = sink_for(tmp_path, data)
    release = threading.Event()
    real_pwrite = os.pwrite

    def held_pwrite(fd: int, chunk: Any, offset: int) -> int:
        release.wait(10)  # the first batch is being written while the others queue
        return real_pwrite(fd, chunk, offset)

    monkeypatch.setattr(os, "pwrite", held_pwrite)
    try:
        first, second, third = (sink.submit([data[i : i + N]]) for i in range(0, 3 * N, N))
        assert second.cancel()  # still queued behind the first
        release.set()
        assert first.result() == N
        with pytest.raises(_Gap):
            third.result()
        assert (tmp_path / "f.part").read_bytes() == data[:N]
        assert sink.pos == N and sink.broken
        sink.rehash_prefix(N)  # what the next try does: hash what is on disk
        assert not sink.broken and sink.submitted == N
        assert sink.hasher.hexdigest() == hashlib.sha256(data[:N]).hexdigest()
    finally:
        release.set()
        sink.close()
        os.close(sink.fd)


def test_after_a_failed_write_nothing_more_is_written(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = os.urandom(3 * N)
    sink = sink_for(tmp_path, data)
    real_pwrite = os.pwrite
    calls = {"n": 0}

    def failing_second(fd: int, chunk: Any, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_pwrite(fd, chunk, offset)

    monkeypatch.setattr(os, "pwrite", failing_second)
    try:
        futures = [sink.submit([data[i : i + N]]) for i in range(0, 3 * N, N)]
        assert futures[0].result() == N
        for f in futures[1:]:
            with pytest.raises(OSError, match="No space"):
                f.result()
        assert calls["n"] == 2  # the third batch was not even tried
        assert (tmp_path / "f.part").read_bytes() == data[:N] and sink.broken
    finally:
        sink.close()
        os.close(sink.fd)
