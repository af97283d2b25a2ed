"""Warm swaps (issue 13 item 5): a swap back to a model whose files are in the page cache, with
prestart's warm path against the blanket drop (`sparkd prestart --cold`), side by side.

Two simulated models, `a` and `b`, each one real file of --size-gib on this host's disk (not a
tmpfs: its pages cannot be dropped). Before each measured swap both files are in the page cache:
`b` was serving, and `a`'s files were read again (what the swap's verification of `a` does while
`b` still serves, or `a`'s own previous run when it is restarted). The measured swap to `a` is
what the engine unit runs: `sparkd prestart a` (real, as a child process, as root so the drop
is the real `drop_caches`), then `sparkd sim-engine` for `a` (it reads every file of its model
directory fully at load, like a real engine's load: sparkd/sim/loading.py), timed until its
/health answers 200. The settle wait is skipped in both (no engine-stopped stamp): it is the
same in both and would only add noise.

The modes alternate (warm, cold, warm, ...) so both see the same machine. After each prestart
the bench reads how much of `a` and `b` is cached (cachestat), so a cold swap is shown to be
really cold and a warm one really warm.

It also times the page-cache adapter's two ways of asking how much of a multi-GB file is cached
(cachestat(2) and mincore(2) over a mapping, sparkd/engine/pagecache.py) and util-linux fincore.

    sudo .venv/bin/python bench/warm_swap.py [--size-gib 2] [--rounds 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from machine import describe

from sparkd.engine.pagecache import PageCache, evict

MIB = 1 << 20
GIB = 1 << 30
SPARKD = [sys.executable, "-c", "from sparkd.main import main; main()"]
PORT = 18931
LOADED = re.compile(r"loaded \d+ files \((?P<mib>[\d.]+) MiB\) in (?P<s>[\d.]+) s")


@dataclass(frozen=True, slots=True)
class Swap:
    mode: str
    prestart_s: float
    load_s: float  # the engine's own "loaded N files in S s" line
    total_s: float  # prestart start to /health 200
    a_cached_after_prestart: int
    b_cached_after_prestart: int
    a_cached_before: int  # just before prestart: less than the file when another's drop came
    decision: str  # what prestart said it did


def decision(stderr: str) -> str:
    for line in stderr.splitlines():
        if ": warm: kept" in line:
            return "kept"
        if ": warm: not kept" in line:
            return "not kept"
        if ": page cache: none of" in line:
            return "nothing cached"
    return "blanket (--cold)"


def write_model(path: Path, size: int) -> Path:
    weights = path / "model-00001-of-00001.safetensors"
    if weights.is_file() and weights.stat().st_size == size:
        return weights
    path.mkdir(parents=True, exist_ok=True)
    block = os.urandom(16 * MIB)
    with weights.open("wb") as f:
        for _ in range(size // len(block)):
            f.write(block)
        f.flush()
        os.fsync(f.fileno())
    return weights


def read_fully(path: Path) -> None:
    with path.open("rb", buffering=0) as f:
        while f.read(8 * MIB):
            pass


def wait_healthy(proc: subprocess.Popen[bytes], timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"sim-engine exited {proc.returncode}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{PORT}/health", timeout=1) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        time.sleep(0.01)
    raise RuntimeError("sim-engine did not become healthy")


def swap_to_a(mode: str, config: Path, root: Path, a: Path, b: Path, cache: PageCache) -> Swap:
    read_fully(b)  # b was serving: its weights are cached
    read_fully(a)  # and a's are cached again (a's verification, or a's previous run)
    stamp = root / "no-engine-stopped"  # absent: the settle wait is skipped, in both modes
    before = cache.cached_bytes(a)
    args = ["prestart", "--config", str(config), "a", "--stopped-stamp", str(stamp)]
    start = time.monotonic()
    pre = subprocess.run([*SPARKD, *args, *(["--cold"] if mode == "cold" else [])],
                         capture_output=True, text=True, timeout=300, check=False)
    prestart_s = time.monotonic() - start
    if pre.returncode != 0:
        raise RuntimeError(f"prestart failed:\n{pre.stderr}")
    a_cached, b_cached = cache.cached_bytes(a), cache.cached_bytes(b)
    log = root / "engine.log"
    with log.open("wb") as out:
        engine = subprocess.Popen(
            [*SPARKD, "sim-engine", "--model", "a", "--path", str(a.parent), "--port",
             str(PORT), "--load-seconds", "0", "--resident-mib", "0"],
            stdout=out, stderr=subprocess.STDOUT)
        try:
            wait_healthy(engine)
            total_s = time.monotonic() - start
        finally:
            engine.terminate()
            engine.wait(timeout=30)
    found = LOADED.search(log.read_text())
    if found is None:
        raise RuntimeError(f"no load line in the engine's log:\n{log.read_text()}")
    return Swap(mode, prestart_s, float(found["s"]), total_s, a_cached, b_cached, before,
                decision(pre.stderr))


def time_counters(path: Path, reps: int = 20) -> dict[str, float]:
    """Median seconds to ask how much of `path` is cached, each way."""
    out: dict[str, float] = {}
    for method in ("cachestat", "mincore"):
        cache = PageCache(method=method)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            cache.cached_bytes(path)
            times.append(time.perf_counter() - t)
        out[method] = statistics.median(times)
    exe = shutil.which("fincore")
    if exe:
        times = []
        for _ in range(5):
            t = time.perf_counter()
            subprocess.run([exe, "--bytes", str(path)], capture_output=True, check=True)
            times.append(time.perf_counter() - t)
        out["fincore (util-linux, a process)"] = statistics.median(times)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-gib", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--dir", type=Path, default=Path("/var/tmp/sparkd-bench-warm"))
    parser.add_argument("--keep", action="store_true", help="keep the model files")
    opts = parser.parse_args()
    if os.geteuid() != 0:
        print("warm_swap: run as root: the cold side is the real drop_caches", file=sys.stderr)
        return 2
    size = int(opts.size_gib * GIB) // (16 * MIB) * 16 * MIB
    root: Path = opts.dir
    a = write_model(root / "a", size)
    b = write_model(root / "b", size)
    config = root / "sparkd.toml"
    config.write_text(
        "[daemon]\nmemory_reserve_gib = 1\nsettle_timeout_s = 5\n\n"
        f'[models.a]\nengine = "sim"\nport = {PORT}\npath = "{a.parent}"\nmemory_gib = 1\n\n'
        f'[models.b]\nengine = "sim"\nport = {PORT + 1}\npath = "{b.parent}"\n'
        "memory_gib = 1\n")
    cache = PageCache()
    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_before = os.getloadavg()
    swaps: list[Swap] = []
    try:
        for _ in range(opts.rounds):
            for mode in ("warm", "cold"):
                swaps.append(swap_to_a(mode, config, root, a, b, cache))
                s = swaps[-1]
                print(f"{mode} ({s.decision}, a {s.a_cached_before / MIB:.0f} MiB cached "
                      f"before): prestart {s.prestart_s:.2f} s, load {s.load_s:.2f} s, total "
                      f"{s.total_s:.2f} s; after prestart a {s.a_cached_after_prestart / MIB:.0f}"
                      f" MiB cached, b {s.b_cached_after_prestart / MIB:.0f} MiB",
                      file=sys.stderr)
        read_fully(a)
        counters = time_counters(a)
    finally:
        evict(a)
        evict(b)
        if not opts.keep:
            shutil.rmtree(root, ignore_errors=True)
    load_after = os.getloadavg()

    def med(mode: str, field: str) -> float:
        return float(statistics.median(getattr(s, field) for s in swaps if s.mode == mode))

    print(f"## Issue 13 item 5: warm swaps, a swap back to a cached model against the blanket "
          f"drop\n\n`bench/warm_swap.py --size-gib {opts.size_gib:g} --rounds {opts.rounds}` "
          f"(run of {started}) on {describe()}, kernel {os.uname().release}, cachestat via "
          f"{cache.method}. Load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
          f"(1 min). Two simulated models of one {size / GIB:.2f} GiB file each on the disk; "
          "both cached before each swap to `a`; medians of the rounds, modes alternating.\n")
    print("| swap to a | prestart | engine load (its own line) | prestart to /health 200 | "
          "a cached after prestart | b cached after prestart |")
    print("| --- | --- | --- | --- | --- | --- |")
    for mode, label in (("warm", "warm (default)"), ("cold", "blanket drop (`--cold`)")):
        print(f"| {label} | {med(mode, 'prestart_s'):.2f} s | {med(mode, 'load_s'):.2f} s | "
              f"{med(mode, 'total_s'):.2f} s | {med(mode, 'a_cached_after_prestart') / MIB:.0f}"
              f" MiB | {med(mode, 'b_cached_after_prestart') / MIB:.0f} MiB |")
    print("\nEach swap, in order (a's cached bytes just before prestart fall short of the "
          "file when something else on the machine dropped the page cache meanwhile):\n")
    print("| mode | a cached before prestart | prestart said | a cached after | load | "
          "to /health 200 |\n| --- | --- | --- | --- | --- | --- |")
    for s in swaps:
        print(f"| {s.mode} | {s.a_cached_before / MIB:.0f} MiB | {s.decision} | "
              f"{s.a_cached_after_prestart / MIB:.0f} MiB | {s.load_s:.2f} s | "
              f"{s.total_s:.2f} s |")
    ratio = med("cold", "total_s") / med("warm", "total_s")
    load_ratio = med("cold", "load_s") / med("warm", "load_s")
    print(f"\nblanket / warm, all rounds: {ratio:.2f}x on the whole swap to healthy, "
          f"{load_ratio:.2f}x on the engine's load alone.")
    # Undisturbed: a was wholly cached before prestart, and (warm) still after it.
    whole = size * 99 // 100
    clean = [s for s in swaps if s.a_cached_before >= whole
             and (s.mode == "cold" or s.a_cached_after_prestart >= whole)]
    warm = [s.total_s for s in clean if s.mode == "warm"]
    cold = [s.total_s for s in clean if s.mode == "cold"]
    if warm and cold:
        print(f"Undisturbed rounds only ({len(warm)} warm, {len(cold)} blanket): "
              f"{statistics.median(warm):.2f} s warm, {statistics.median(cold):.2f} s blanket, "
              f"{statistics.median(cold) / statistics.median(warm):.2f}x; engine load "
              f"{statistics.median(s.load_s for s in clean if s.mode == 'warm'):.2f} s against "
              f"{statistics.median(s.load_s for s in clean if s.mode == 'cold'):.2f} s.")
    print()
    print(f"Asking how much of the {size / GIB:.2f} GiB file (fully cached) is in the page "
          "cache, median:\n\n| way | time |\n| --- | --- |")
    for way, seconds in counters.items():
        print(f"| {way} | {seconds * 1000:.2f} ms |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
