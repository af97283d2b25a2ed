"""`sparkd prestart` for real: a subprocess on this host, and RealSystem's fadvise fallback.

This host may or may not let root write /proc/sys/vm/drop_caches (a container can mount
/proc/sys read-only), so the subprocess tests accept either path and check that the log line
says which one was taken. The fallback itself is tested in-process by pointing RealSystem at a
drop_caches path that cannot be opened, and checking page residency with mincore(2).
"""

from __future__ import annotations

import ctypes
import mmap
import os
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from sparkd.engine.prestart import PrestartPlan, RealSystem, run_prestart
from sparkd.monitor.memory import SettleRule

FILE_SIZES = {"config.json": 2048, "model-00001.safetensors": 8 << 20, "model-00002.bin": 3 << 20}

Run = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    root = tmp_path / "model"
    (root / "sub").mkdir(parents=True)
    for i, (name, size) in enumerate(FILE_SIZES.items()):
        where = root / "sub" if i == 2 else root
        with (where / name).open("wb") as f:
            f.write(os.urandom(size))
            f.flush()
            os.fsync(f.fileno())
    return root


def _config(tmp_path: Path, model_dir: Path, memory_gib: float) -> Path:
    path = tmp_path / "sparkd.toml"
    path.write_text(
        "[daemon]\nmemory_reserve_gib = 0.5\nsettle_timeout_s = 5\n\n"
        f'[models.m]\nengine = "sim"\nport = 8101\npath = "{model_dir}"\n'
        f"memory_gib = {memory_gib}\n"
    )
    return path


@pytest.fixture
def run_prestart_cli(sparkd_cli: Run) -> Run:
    """`sparkd prestart ARGS...` as a child process."""
    return lambda *args, timeout=60: sparkd_cli("prestart", *args, timeout=timeout)


DROPPED = re.compile(
    r"^prestart m: drop_caches: freed \d+(\.\d)? (B|KiB|MiB|GiB) of page cache in \d+ ms "
)
FELL_BACK = re.compile(
    r"^prestart m: drop_caches: /proc/sys/vm/drop_caches not writable \(\w+: [^)]*\); "
    r"fell back to posix_fadvise\(DONTNEED\) on 3 files \(11 MiB\) under (?P<path>\S+) "
    r"\(other page cache stays\): freed "
)


def _drop_line(stderr: str) -> str:
    (line,) = [x for x in stderr.splitlines() if x.startswith("prestart m: drop_caches:")]
    assert DROPPED.match(line) or FELL_BACK.match(line), line
    return line


def test_prestart_admits(tmp_path: Path, model_dir: Path, run_prestart_cli: Run) -> None:
    # An engine stopped a moment ago (its unit's ExecStopPost touched the stamp): settle.
    stamp = tmp_path / "engine-stopped"
    stamp.touch()
    # --cold: the blanket drop (the warm path is tested in test_warm_real.py).
    result = run_prestart_cli("--config", str(_config(tmp_path, model_dir, 0.001)), "m",
                              "--stopped-stamp", str(stamp), "--cold")
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    sim_dir, *lines = result.stderr.splitlines()
    # A simulated engine's weights directory is prepared first (the engine user writes it).
    assert sim_dir == f"prestart m: sim weights directory {model_dir} exists"
    assert [line.split(":")[1].strip() for line in lines] == [
        "sync", "drop_caches", "settle", "memory gate"
    ]
    assert re.match(r"^prestart m: sync: flushed dirty pages \(.*\) in \d+ ms$", lines[0])
    drop = _drop_line(result.stderr)
    fell_back = FELL_BACK.match(drop)
    if fell_back:
        assert fell_back["path"] == str(model_dir)
    assert re.match(r"^prestart m: settle: MemAvailable (settled at|still rising after) ", lines[2])
    assert re.match(
        r"^prestart m: memory gate: ok: needs 0\.0 GiB \+ 0\.5 GiB reserve, \d+\.\d GiB available",
        lines[3],
    )


def test_prestart_skips_the_settle_wait_when_no_engine_stopped_lately(
    tmp_path: Path, model_dir: Path, run_prestart_cli: Run
) -> None:
    config = str(_config(tmp_path, model_dir, 0.001))
    stamp = tmp_path / "engine-stopped"
    # No stamp: no engine stopped since boot (the first start after a power cut).
    result = run_prestart_cli("--config", config, "m", "--stopped-stamp", str(stamp))
    assert result.returncode == 0, result.stderr
    skipped = ("prestart m: settle: skipped (no sparkd engine stopped in the last 5 s: nothing "
               "is giving memory back)")
    assert skipped in result.stderr.splitlines()
    assert "memory gate: ok" in result.stderr
    # A stamp older than settle_timeout_s (5 s): skipped too.
    stamp.touch()
    old = time.time() - 6
    os.utime(stamp, (old, old))
    result = run_prestart_cli("--config", config, "m", "--stopped-stamp", str(stamp))
    assert skipped in result.stderr.splitlines(), result.stderr


def test_prestart_refuses_a_huge_model(
    tmp_path: Path, model_dir: Path, run_prestart_cli: Run
) -> None:
    result = run_prestart_cli("--config", str(_config(tmp_path, model_dir, 100000)), "m")
    assert result.returncode == 1, result.stderr
    _drop_line(result.stderr)
    last = result.stderr.splitlines()[-1]
    assert re.fullmatch(
        r"prestart m: refused: needs 100000\.0 GiB \+ 0\.5 GiB reserve, \d+\.\d GiB available "
        r"\(stop other GPU work or lower memory_gib\)",
        last,
    ), last


def test_prestart_unknown_model_and_bad_config(
    tmp_path: Path, model_dir: Path, run_prestart_cli: Run
) -> None:
    config = _config(tmp_path, model_dir, 1)
    result = run_prestart_cli("--config", str(config), "nope")
    assert result.returncode == 2
    assert result.stderr.strip() == f"unknown model 'nope' (configured in {config}: m)"
    missing = tmp_path / "missing.toml"
    result = run_prestart_cli("--config", str(missing), "m")
    assert result.returncode == 2
    assert result.stderr.startswith(f"{missing}: file not found")


# --- RealSystem's fallback, in-process ---------------------------------------------------------


def resident_pages(path: Path) -> int:
    """Pages of `path` in the page cache, by mincore(2) on a private mapping of it."""
    size = path.stat().st_size
    libc = ctypes.CDLL(None, use_errno=True)
    npages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with path.open("rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mapped:
        view = (ctypes.c_char * size).from_buffer(mapped)
        try:
            vec = (ctypes.c_ubyte * npages)()
            if libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(size), vec):
                raise OSError(ctypes.get_errno(), "mincore failed")
            return sum(v & 1 for v in vec)
        finally:
            del view


def test_fadvise_fallback_evicts_the_model_files(tmp_path: Path, model_dir: Path) -> None:
    files = sorted(p for p in model_dir.rglob("*") if p.is_file())
    for path in files:
        path.read_bytes()  # into the page cache
    assert all(resident_pages(p) > 0 for p in files)
    system = RealSystem(drop_caches_path=tmp_path / "no-such-dir" / "drop_caches")
    plan = PrestartPlan(
        model="m", model_path=model_dir, memory_gib=0, reserve_gib=0,
        settle=SettleRule(timeout_s=2), warm=False,
    )
    lines: list[str] = []
    report = run_prestart(plan, system, lines.append)
    assert report.drop.method == "fadvise"
    assert (report.drop.files, report.drop.failed) == (3, 0)
    assert FELL_BACK.match(lines[1]), lines[1]
    assert "(FileNotFoundError: No such file or directory)" in lines[1]
    assert [resident_pages(p) for p in files] == [0] * len(files)


def test_regular_files_follows_file_symlinks_once(tmp_path: Path) -> None:
    # A Hugging Face snapshot: the files are symlinks into blobs/.
    blobs, snap = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snap.mkdir(parents=True)
    (blobs / "sha-a").write_bytes(b"a" * 10)
    (blobs / "sha-b").write_bytes(b"b" * 20)
    (snap / "a.safetensors").symlink_to(blobs / "sha-a")
    (snap / "b.safetensors").symlink_to(blobs / "sha-b")
    (snap / "same-as-a").symlink_to(blobs / "sha-a")
    (snap / "dangling").symlink_to(tmp_path / "gone")
    (snap / "loop").symlink_to(snap, target_is_directory=True)
    os.mkfifo(snap / "fifo")
    found = RealSystem().regular_files(snap)
    assert sorted((p.name, size) for p, size in found) in (
        [("a.safetensors", 10), ("b.safetensors", 20)],
        [("b.safetensors", 20), ("same-as-a", 10)],
    )
    single = RealSystem().regular_files(blobs / "sha-b")  # a .gguf is one file
    assert single == [(blobs / "sha-b", 20)]
    with pytest.raises(FileNotFoundError):
        RealSystem().regular_files(tmp_path / "nowhere")
