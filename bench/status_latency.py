"""Bar (issue 2): `sparkctl status` median wall time <= 250 ms, beside
`systemctl status sparkd-engine@NAME` measured in the same run, in a booted systemd.

Each command runs N times inside the container, timed there (no nsenter in the timing).
"""

from __future__ import annotations

import json
import sys

from container import machine, sparkd_container

N = 40
BAR_MS = 250.0

TIMER = r"""
import json, statistics, subprocess, sys, time
n = int(sys.argv[1]); cmds = json.loads(sys.argv[2]); out = {}
for name, argv in cmds.items():
    subprocess.run(argv, capture_output=True, check=True)  # warm the page cache
    samples = []
    for _ in range(n):
        t = time.perf_counter()
        subprocess.run(argv, capture_output=True, check=True)
        samples.append((time.perf_counter() - t) * 1000)
    samples.sort()
    out[name] = {"median_ms": statistics.median(samples), "p90_ms": samples[int(0.9 * n) - 1],
                 "min_ms": samples[0]}
print(json.dumps(out))
"""


def main() -> int:
    commands = {
        "sparkctl status": ["sparkctl", "status"],
        "sparkctl status --json": ["sparkctl", "status", "--json"],
        "systemctl status sparkd-engine@sim-small": [
            "systemctl", "status", "--no-pager", "sparkd-engine@sim-small"],
    }
    with sparkd_container() as box:
        res = box.exec(["python3", "-c", TIMER, str(N), json.dumps(commands)], timeout=300)
    results = json.loads(res.stdout)
    base = results["systemctl status sparkd-engine@sim-small"]["median_ms"]
    print(f"machine: {machine()}; {N} runs each, inside a booted systemd container")
    print(f"{'command':45} {'median':>9} {'p90':>9} {'min':>9} {'vs systemctl':>13}")
    for name, r in results.items():
        print(f"{name:45} {r['median_ms']:7.1f}ms {r['p90_ms']:7.1f}ms {r['min_ms']:7.1f}ms "
              f"{r['median_ms'] / base:12.2f}x")
    median = results["sparkctl status"]["median_ms"]
    ok = median <= BAR_MS
    print(f"bar: sparkctl status median {median:.1f} ms <= {BAR_MS:.0f} ms: "
          f"{'MET' if ok else 'NOT MET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
