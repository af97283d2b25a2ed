"""Bars (issue 4) for verification, each beside its baseline in the same run:

1. a 4 GiB file verified at >= 0.95x the speed of `openssl dgst -sha256` on the same file;
2. >= 1.8x speed-up from hashing several files in parallel on 2 cores (vs one at a time);
3. incremental verification of an unchanged 100-file model in <= 100 ms.

Files live in a scratch directory on disk and are read from the page cache by both sides
(one read first warms it), so the numbers compare hashing, not the disk. Runs alternate
between the two sides; medians are reported.

    .venv/bin/python bench/store_hash.py [--quick]
"""

from __future__ import annotations

import hashlib
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from store_common import machine, scratch

from sparkd.config import parse_config
from sparkd.store.manifest import FileEntry, Manifest, make_manifest
from sparkd.store.model import verify_model
from sparkd.store.verify import hash_file, verify_dir

GIB = 1 << 30
MIB = 1 << 20


def write_file(path: Path, size: int, seed: int) -> str:
    """A file of `size` bytes (a random 64 MiB block repeated); its SHA-256."""
    block = os.urandom(64 * MIB)
    h = hashlib.sha256()
    with path.open("wb") as f:
        left = size
        while left:
            piece = block[: min(left, len(block))]
            f.write(piece)
            h.update(piece)
            left -= len(piece)
    return h.hexdigest()


def warm(path: Path) -> None:
    with path.open("rb", buffering=0) as f:
        buf = bytearray(8 * MIB)
        while f.readinto(buf):
            pass


def timed(fn: object) -> float:
    start = time.perf_counter()
    fn()  # type: ignore[operator]
    return time.perf_counter() - start


def manifest_of(files: dict[str, tuple[int, str]], model: str = "bench") -> Manifest:
    return make_manifest(
        model=model, source=None, requested_revision=None, revision=None,
        files=[FileEntry(p, size, "sha256", digest) for p, (size, digest) in files.items()],
    )


def bar_single(tmp: Path, size: int, rounds: int) -> tuple[bool, str]:
    path = tmp / "big.safetensors"
    digest = write_file(path, size, 1)
    warm(path)
    m = manifest_of({path.name: (size, digest)})
    ours, theirs = [], []
    for _ in range(rounds):
        theirs.append(timed(lambda: subprocess.run(
            ["openssl", "dgst", "-sha256", str(path)], check=True, capture_output=True)))
        ours.append(timed(lambda: verify_dir(tmp, m, full=True, workers=1)))
    assert hash_file(path, "sha256")[0] == digest
    o, t = statistics.median(ours), statistics.median(theirs)
    ratio = t / o  # speed ratio: ours / openssl's
    path.unlink()
    line = (f"1. verify {size / GIB:.0f} GiB: sparkd {size / o / GIB:.2f} GiB/s, "
            f"openssl dgst -sha256 {size / t / GIB:.2f} GiB/s: {ratio:.3f}x (bar >= 0.95x)")
    return ratio >= 0.95, line


def bar_parallel(tmp: Path, n: int, size: int, rounds: int) -> tuple[bool, str]:
    files = {}
    for i in range(n):
        path = tmp / f"shard-{i}.safetensors"
        files[path.name] = (size, write_file(path, size, 10 + i))
        warm(path)
    m = manifest_of(files)
    workers = len(os.sched_getaffinity(0))
    paths = [str(tmp / name) for name in files]

    def openssl_parallel() -> None:
        # The same split by OpenSSL: `workers` processes, the files dealt out round-robin.
        procs = [subprocess.Popen(["openssl", "dgst", "-sha256", *paths[i::workers]],
                                  stdout=subprocess.DEVNULL) for i in range(workers)]
        for proc in procs:
            assert proc.wait() == 0

    seq, par, o_seq, o_par, cpu = [], [], [], [], []
    for _ in range(rounds):
        seq.append(timed(lambda: verify_dir(tmp, m, full=True, workers=1)))
        before = os.times()
        par.append(timed(lambda: verify_dir(tmp, m, full=True, workers=workers)))
        after = os.times()
        cpu.append((after.user - before.user + after.system - before.system) / par[-1])
        o_seq.append(timed(lambda: subprocess.run(["openssl", "dgst", "-sha256", *paths],
                                                  check=True, capture_output=True)))
        o_par.append(timed(openssl_parallel))
    assert verify_dir(tmp, m, full=True).ok
    s, p = statistics.median(seq), statistics.median(par)
    os_, op = statistics.median(o_seq), statistics.median(o_par)
    for name in files:
        (tmp / name).unlink()
    total = n * size
    line = (f"2. {n} files of {size / MIB:.0f} MiB: one at a time {total / s / GIB:.2f} GiB/s, "
            f"{workers} threads {total / p / GIB:.2f} GiB/s: {s / p:.2f}x (bar >= 1.8x); "
            f"CPUs busy while hashing in parallel {statistics.median(cpu):.2f}; "
            f"OpenSSL in the same run: one process {total / os_ / GIB:.2f} GiB/s, {workers} "
            f"processes {total / op / GIB:.2f} GiB/s: {os_ / op:.2f}x")
    return s / p >= 1.8, line


def bar_incremental(tmp: Path, n: int, rounds: int) -> tuple[bool, str]:
    root = tmp / "models" / "hundred"
    root.mkdir(parents=True)
    files = {}
    for i in range(n):
        data = os.urandom(64 * 1024)
        (root / f"f{i:03}.bin").write_bytes(data)
        files[f"f{i:03}.bin"] = (len(data), hashlib.sha256(data).hexdigest())
    text = (
        f'[daemon]\nstate_dir = "{tmp / "state"}"\n'
        f'[models.hundred]\nengine = "vllm"\nport = 8400\npath = "{root}"\n'
    )
    (tmp / "c.toml").write_text(text)
    config = parse_config(text, source=tmp / "c.toml")
    from sparkd.store.manifest import ManifestStore

    ManifestStore(config.daemon.state_dir).save(manifest_of(files, "hundred"))
    model = config.model("hundred")
    first = verify_model(config, model)  # hashes all 100, saves the stamps
    assert first.ok and first.hashed_bytes == n * 64 * 1024
    samples = []
    for _ in range(rounds):
        t = timed(lambda: verify_model(config, model))
        samples.append(t * 1000)
    again = verify_model(config, model)
    assert again.ok and again.hashed_bytes == 0
    cli = []
    path = [str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, path))}
    for _ in range(5):
        cli.append(timed(lambda: subprocess.run(
            [sys.executable, "-c", "from sparkd.ctl.main import main; main()", "verify", "hundred",
             "--json", "--config", str(tmp / "c.toml")], check=True, capture_output=True,
            env=env)) * 1000)
    med = statistics.median(samples)
    line = (f"3. incremental verify of an unchanged {n}-file model: {med:.1f} ms median "
            f"(p90 {sorted(samples)[int(0.9 * rounds) - 1]:.1f} ms; the whole "
            f"`sparkctl verify --json` process {statistics.median(cli):.0f} ms) (bar <= 100 ms)")
    return med <= 100, line


def main() -> int:
    quick = "--quick" in sys.argv
    print(f"machine: {machine()}")
    results = []
    with scratch("sparkd-bench-hash-") as tmp:
        results.append(bar_single(tmp, (1 if quick else 4) * GIB, 3))
        print(results[-1][1], flush=True)
        results.append(bar_parallel(tmp, 4, (128 if quick else 512) * MIB, 3))
        print(results[-1][1], flush=True)
        results.append(bar_incremental(tmp, 100, 30))
        print(results[-1][1], flush=True)
    for ok, line in results:
        print(("MET     " if ok else "NOT MET ") + line.split(":")[0])
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
