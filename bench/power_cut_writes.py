"""Issue 12's recorded run: at least 200 power cuts at random points of sparkd's state and
accepted-config writes (tests/system/write_cuts.py: the writer, the cut, the checks), in one
booted systemd container with the .deb installed. Prints the outcomes (old/new value of the
state and of the accepted copy), the failures (must be 0), where the cuts fell, and the
durations (boot to the first chat completion through the gateway; one whole cut).

Run as root after `make deb`: `sudo .venv/bin/python bench/power_cut_writes.py --cuts 200`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from container import REPO, deb_path, machine
from harness import Container
from write_cuts import run_cuts


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cuts", type=int, default=200)
    parser.add_argument("--seed", type=int, default=1203)
    parser.add_argument("--json", help="also write the summary as JSON to this file")
    args = parser.parse_args()
    deb = deb_path()
    load_before = os.getloadavg()
    start = time.monotonic()
    with Container(deb_dir=deb.parent, src_dir=REPO) as box:
        box.boot()
        box.wait_running()
        box.install_deb(deb.name)
        summary = run_cuts(box, args.cuts, seed=args.seed)
    took = time.monotonic() - start
    load_after = os.getloadavg()
    if args.json:
        with open(args.json, "w") as f:
            f.write(summary.as_json() + "\n")
    boot = summary.boot_to_chat_s
    cut = summary.cut_s
    print(f"machine: {machine()}")
    print(f"load average before {load_before[0]:.2f} {load_before[1]:.2f} {load_before[2]:.2f}, "
          f"after {load_after[0]:.2f} {load_after[1]:.2f} {load_after[2]:.2f}")
    print(f"{summary.cuts} cuts in {took:.0f} s (seed {args.seed})")
    print(f"state.toml: old {summary.state['old']}, new {summary.state['new']}")
    print(f"accepted.toml: old {summary.accepted['old']}, new {summary.accepted['new']}")
    print(f"cut fell before the state write: {summary.phase['S']}, before the accepted "
          f"write: {summary.phase['A']}; writes per cut: median "
          f"{statistics.median(summary.writes):.0f} (min {min(summary.writes)}, max "
          f"{max(summary.writes)})")
    print(f"cuts that left a temp file of the write they stopped (removed by sparkd's "
          f"next start; a failure if one stays): {summary.temp_files}")
    if boot:
        print(f"boot to first chat completion: median {statistics.median(boot):.3f} s "
              f"(min {min(boot):.3f}, max {max(boot):.3f})")
    if cut:
        print(f"one cut (writer start to sparkd quiet after the boot): median "
              f"{statistics.median(cut):.3f} s (min {min(cut):.3f}, max {max(cut):.3f})")
    print(f"failures: {len(summary.failures)}")
    for failure in summary.failures:
        print(f"  {failure}")
    return 1 if summary.failures else 0


if __name__ == "__main__":
    sys.exit(main())
