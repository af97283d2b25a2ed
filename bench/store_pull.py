"""Bars (issue 4) for downloads, beside curl in the same run, from the local fake hub
(tests/integration/hubserver.py, in a process of its own) on loopback:

4. pull at >= 0.9x the speed of `curl` on the same file (curl -L on the same resolve URL,
   following the same redirect to the CDN origin; the pull also asks the Hub's API first,
   hashes every byte, fsyncs and renames, and those count in its time);
5. resuming a 1 GiB file cut in half transfers <= 1.01x the missing bytes (counted by the
   server: body bytes it sent).

Beside bar 4, not instead of it: the same comparison with the server pacing its bodies to a
10 Gbit/s link (the Spark's Ethernet port). On loopback the transfer is faster than one core
can SHA-256, so bar 4 measures the hash; the paced run shows what a user on a real link gets.

Files land in a scratch directory on disk; between runs the output is deleted and `sync`ed
outside the timings, so the dirty pages of one run do not slow the next.

    .venv/bin/python bench/store_pull.py [--quick]
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from store_common import HubProcess, machine, scratch

from sparkd.config import Config, parse_config
from sparkd.store.manifest import ManifestStore
from sparkd.store.model import pull_model

GIB = 1 << 30
MIB = 1 << 20
NAME = "model.safetensors"
REPO = "bench/one"


def make_config(tmp: Path) -> Config:
    text = (
        f'[daemon]\nstate_dir = "{tmp / "state"}"\n'
        f'[models.one]\nengine = "vllm"\nport = 8400\npath = "{tmp / "models" / "one"}"\n'
        f'source = "hf://{REPO}"\n'
    )
    return parse_config(text, source=tmp / "c.toml")


def clean(config: Config) -> None:
    shutil.rmtree(config.model("one").path, ignore_errors=True)
    ManifestStore(config.daemon.state_dir).path("one").unlink(missing_ok=True)
    os.sync()


LINK_10GBE = 10e9 / 8  # bytes/s: the Spark's RJ-45 port, the fastest way to the Hub it has


def side_by_side(
    hub: HubProcess, config: Config, size: int, rounds: int, out: Path
) -> tuple[float, float, float, str]:
    """curl, then the pull, `rounds` times; medians of curl's, curl+sync's and the pull's."""
    url = f"{hub.endpoint}/{REPO}/resolve/{hub.commit}/{NAME}"
    os.environ["HF_ENDPOINT"] = hub.endpoint
    ours, theirs, theirs_sync = [], [], []
    for _ in range(rounds):
        out.unlink(missing_ok=True)
        os.sync()
        start = time.perf_counter()
        subprocess.run(["curl", "-sfL", "-o", str(out), url], check=True)
        theirs.append(time.perf_counter() - start)
        subprocess.run(["sync", str(out)], check=True)
        theirs_sync.append(time.perf_counter() - start)
        assert out.stat().st_size == size
        out.unlink()
        clean(config)
        start = time.perf_counter()
        report = pull_model(config, config.model("one"))
        ours.append(time.perf_counter() - start)
        assert report.ok and report.fetched_bytes == size, report
        clean(config)
    o, t, ts = (statistics.median(x) for x in (ours, theirs, theirs_sync))
    line = (
        f"sparkd {size / o / MIB:.0f} MiB/s (median of {rounds}; runs "
        f"{', '.join(f'{x:.2f}' for x in ours)} s), curl {size / t / MIB:.0f} MiB/s "
        f"({', '.join(f'{x:.2f}' for x in theirs)} s): {t / o:.2f}x (bar >= 0.9x); against "
        f"curl followed by sync of its file {ts / o:.2f}x"
    )
    return o, t, ts, line


def main() -> int:
    quick = "--quick" in sys.argv
    size = (256 * MIB) if quick else GIB
    rounds = 3 if quick else 5
    print(f"machine: {machine()}")
    print(f"load average before: {Path('/proc/loadavg').read_text().split()[:3]}")
    paced = HubProcess(REPO, {NAME: (size, 7)}, rate=LINK_10GBE)
    hub = HubProcess(REPO, {NAME: (size, 7)})
    try:
        with scratch("sparkd-bench-pull-") as tmp:
            config = make_config(tmp)
            out = tmp / "curl.out"
            o, t, _, line = side_by_side(hub, config, size, rounds, out)
            ratio = t / o
            print(f"4. pull {size / MIB:.0f} MiB from the local server on loopback: {line}")
            po, pt, _, line = side_by_side(paced, config, size, rounds, out)
            print(f"4'. the same, the server paced to a 10 Gbit/s link: {line}")
            os.environ["HF_ENDPOINT"] = hub.endpoint

            # 5: a file cut in half, resumed.
            report = pull_model(config, config.model("one"))
            assert report.ok
            dest = config.model("one").path / NAME
            half = size // 2
            part = dest.with_name(f".{NAME}.part")
            with dest.open("rb") as src, part.open("wb") as dst:
                dst.write(src.read(half))
            dest.unlink()
            ManifestStore(config.daemon.state_dir).path("one").unlink()
            os.sync()
            hub.reset()
            report = pull_model(config, config.model("one"))
            assert report.ok
            sent = sum(
                e["sent"] for e in hub.log() if e["file"] == NAME and e["method"] == "GET"
            )
            missing = size - half
            resume_ratio = sent / missing
            print(
                f"5. resume of a {size / MIB:.0f} MiB file cut in half: server sent {sent} bytes "
                f"for {missing} missing ({resume_ratio:.4f}x, bar <= 1.01x); the client "
                f"received {report.fetched_bytes}"
            )
    finally:
        hub.close()
        paced.close()
    results = [(ratio >= 0.9, "4. pull vs curl"),
               (pt / po >= 0.9, "4'. pull vs curl on a 10 Gbit/s link (not the bar)"),
               (resume_ratio <= 1.01, "5. resume")]
    for ok, what in results:
        print(("MET     " if ok else "NOT MET ") + what)
    return 0 if all(ok for ok, _ in results) else 1


if __name__ == "__main__":
    sys.exit(main())
