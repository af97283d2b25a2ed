"""Warm swaps on real files: prestart's eviction of the other models' pages, the target's kept
(or dropped when memory says so), checked with util-linux fincore; and the page-cache adapter's
two ways of asking (cachestat(2), mincore(2)) against each other."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from sparkd.engine.pagecache import PAGE, PageCache, evict
from sparkd.engine.prestart import PrestartPlan, RealSystem, run_prestart
from sparkd.monitor.memory import GIB, MIB, SettleRule

SIZE = 256 * MIB  # large enough to see, small enough for a shared test machine
# What stays of the target: all of it, but for the odd page the kernel reclaims meanwhile on a
# busy shared machine.
KEPT = SIZE * 9 // 10
Run = Callable[..., subprocess.CompletedProcess[str]]


def _write(path: Path, size: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    block = os.urandom(MIB)
    with path.open("wb") as f:
        for _ in range(size // MIB):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return path


def _read(path: Path) -> None:
    with path.open("rb", buffering=0) as f:
        while f.read(8 * MIB):
            pass


def fincore(path: Path) -> int:
    """Bytes of `path` in the page cache, as util-linux fincore counts them."""
    exe = shutil.which("fincore")
    if exe is None:
        pytest.skip("util-linux fincore is not installed")
    out = subprocess.run([exe, "--bytes", "--noheadings", "--output", "RES", str(path)],
                         capture_output=True, text=True, check=True, timeout=30).stdout
    return int(out.strip())


@pytest.fixture
def models(tmp_path: Path) -> tuple[Path, Path]:
    """Two models on the disk (not a tmpfs: its pages cannot be dropped), both read into the
    page cache, as after a swap from `target` to `other`."""
    target = _write(tmp_path / "target" / "model.safetensors", SIZE)
    other = _write(tmp_path / "other" / "model.gguf", SIZE)
    # Read again when something else on this (shared) machine dropped the page cache meanwhile.
    for _ in range(3):
        for path in (target, other):
            _read(path)
        if fincore(target) >= KEPT and fincore(other) >= KEPT:
            return target, other
    raise AssertionError(f"{tmp_path}: what was read does not stay in the page cache")


def _plan(target: Path, other: Path, memory_gib: float) -> PrestartPlan:
    return PrestartPlan(model="target", model_path=target.parent, memory_gib=memory_gib,
                        reserve_gib=0, settle=SettleRule(timeout_s=0),
                        others=(("other", other.parent),))


def test_warm_keeps_the_target_and_evicts_the_other(models: tuple[Path, Path]) -> None:
    target, other = models
    lines: list[str] = []
    report = run_prestart(_plan(target, other, 0.01), RealSystem(), lines.append)
    assert fincore(other) == 0
    assert fincore(target) >= KEPT
    assert report.kept >= KEPT and report.drop.method == "evict"
    assert report.evicted is not None and report.evicted.files == 1
    assert any(line.startswith("prestart target: warm: kept ") for line in lines), lines


def test_warm_drops_everything_when_memory_says_so(
    tmp_path: Path, models: tuple[Path, Path]
) -> None:
    target, other = models
    # A meminfo where 10 GiB is available: less the 0.25 GiB cached that is 9.75 GiB, short of
    # the 9.9 GiB asked; after the drop the 10 GiB covers it. The page cache itself is real.
    # drop_caches is pointed nowhere, so the drop is the root-free fadvise of the target's files
    # (this test does not drop the whole shared machine's cache).
    meminfo = tmp_path / "meminfo"
    meminfo.write_text(f"MemTotal: {20 * GIB // 1024} kB\nMemFree: {5 * GIB // 1024} kB\n"
                       f"MemAvailable: {10 * GIB // 1024} kB\nCached: {5 * GIB // 1024} kB\n")
    system = RealSystem(meminfo_path=meminfo, drop_caches_path=tmp_path / "none" / "drop")
    lines: list[str] = []
    report = run_prestart(_plan(target, other, 9.9), system, lines.append)
    assert fincore(other) == 0
    assert fincore(target) == 0
    assert report.kept == 0 and report.drop.method == "fadvise"
    (warm,) = [line for line in lines if line.startswith("prestart target: warm:")]
    assert re.search(r"= 9\.8 GiB does not cover 9\.9 GiB \+ 0\.0 GiB reserve; dropping", warm)


def test_nothing_cached_is_the_blanket_drop(tmp_path: Path, models: tuple[Path, Path]) -> None:
    target, other = models
    evict(target)
    system = RealSystem(drop_caches_path=tmp_path / "none" / "drop")  # fadvise: target only
    lines: list[str] = []
    report = run_prestart(_plan(target, other, 0.01), system, lines.append)
    assert report.evicted is None and report.drop.method == "fadvise"
    assert "prestart target: page cache: none of target's 256 MiB of files cached: dropping "\
           "the whole page cache" in lines
    assert fincore(other) >= KEPT  # the fallback only evicts the target's own files


def test_cli_warm_swap(tmp_path: Path, models: tuple[Path, Path], sparkd_cli: Run) -> None:
    target, other = models
    config = tmp_path / "sparkd.toml"
    config.write_text(
        "[daemon]\nmemory_reserve_gib = 0.5\nsettle_timeout_s = 5\n\n"
        f'[models.target]\nengine = "llamacpp"\nport = 8101\npath = "{target.parent}"\n'
        f'memory_gib = 0.01\n\n[models.other]\nengine = "llamacpp"\nport = 8102\n'
        f'path = "{other.parent}"\nmemory_gib = 0.01\n')
    result = sparkd_cli("prestart", "--config", str(config), "target", "--stopped-stamp",
                        str(tmp_path / "no-stamp"))
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[1].strip() for line in result.stderr.splitlines()] == [
        "sync", "page cache", "evict", "settle", "warm", "memory gate"
    ], result.stderr
    assert "evict: posix_fadvise(DONTNEED) on 1 file (256 MiB) of the other models (other)" \
        in result.stderr
    assert fincore(other) == 0
    assert fincore(target) >= KEPT


@pytest.mark.parametrize("method", ["cachestat", "mincore"])
def test_page_cache_counts_what_is_cached(tmp_path: Path, method: str) -> None:
    path = _write(tmp_path / "f", 64 * MIB)
    evict(path)
    cache = PageCache(method=method)  # type: ignore[arg-type]
    assert cache.cached_bytes(path) == 0 == fincore(path)
    with path.open("rb") as f:
        f.seek(16 * MIB)
        f.read(8 * MIB)
    got = cache.cached_bytes(path)
    # Readahead may bring in a little more than was read: the two counters must agree.
    assert got == fincore(path) and 8 * MIB <= got < 64 * MIB
    assert got % PAGE == 0
    empty = tmp_path / "empty"
    empty.touch()
    assert cache.cached_bytes(empty) == 0
    with pytest.raises(FileNotFoundError):
        cache.cached_bytes(tmp_path / "missing")


def test_page_cache_picks_cachestat_on_this_kernel(tmp_path: Path) -> None:
    cache = PageCache()
    cache.cached_bytes(_write(tmp_path / "f", MIB))
    release = tuple(int(x) for x in re.findall(r"\d+", os.uname().release)[:2])
    assert cache.method == ("cachestat" if release >= (6, 5) else "mincore")


def test_a_fifo_in_place_of_a_model_file_is_an_error_not_a_hang(tmp_path: Path) -> None:
    # The walk keeps regular files only, but a file can be replaced between the walk and the
    # measure or the evict (a model volume others can write). open() of a FIFO with no writer
    # blocked prestart (the engine's start) until systemd's start timeout.
    import threading

    fifo = tmp_path / "model.gguf"
    os.mkfifo(fifo)
    errors: list[BaseException] = []

    def calls() -> None:
        for call in (lambda: PageCache().cached_bytes(fifo), lambda: evict(fifo)):
            try:
                call()
            except OSError as exc:
                errors.append(exc)

    worker = threading.Thread(target=calls, daemon=True)
    worker.start()
    worker.join(10)
    if worker.is_alive():  # a writer's open releases the blocked reader
        for _ in range(2):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
            worker.join(5)
        pytest.fail("measuring or evicting a FIFO blocked")
    assert len(errors) == 2
    assert all("not a regular file" in str(e) for e in errors)
