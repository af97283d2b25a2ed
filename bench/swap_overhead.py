"""Bar (issue 3): sparkd's swap overhead median <= 300 ms, and its swap time over a hand-run
swap (`systemctl stop A; systemctl start B; poll /health`) <= 1.1, in one run, in a booted
systemd with two simulated models of fixed load time.

With `--llamacpp` (issue 9's bar): `b` is the real llama-server (`make llama-server`) on a tiny
generated GGUF, so the swaps go sim <-> llama.cpp and the overhead is measured against the
real engine.

sparkd's overhead = its swap time (the daemon's own `swap_done` duration) minus the engine
stop and the engine start that its step events report. The start step is the unit's start
job: prestart (sync, drop caches, settle, memory gate), the load and the health wait, which
the hand-run swap pays too, since it starts the same unit. The ratio compares wall times
seen by the caller: `sparkctl swap B` against the hand-run commands.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

from container import machine, sparkd_container

N = 10  # swaps of each kind (alternating a -> b -> a ...)
LOAD_S = 2.0
OVERHEAD_BAR_MS = 300.0
RATIO_BAR = 1.1

CONFIG = f"""
[daemon]
default_model = "a"
memory_reserve_gib = 1
settle_timeout_s = 5
[models.a]
engine = "sim"
port = 8101
load_timeout_s = 60
args = ["--load-seconds", "{LOAD_S}", "--resident-mib", "64", "--weights-mib", "64"]
[models.b]
engine = "sim"
port = 8102
load_timeout_s = 60
args = ["--load-seconds", "{LOAD_S}", "--resident-mib", "64", "--weights-mib", "64"]
"""

GGUF = "/var/lib/sparkd/models/tiny/tiny.gguf"
REPO = Path(__file__).resolve().parents[1]


def llamacpp_config() -> str:
    binary = subprocess.run([str(REPO / "scripts" / "build-llama-server.sh"), "--print-path"],
                            capture_output=True, text=True, check=True).stdout.strip()
    return CONFIG.split("[models.b]")[0] + f"""[models.b]
engine = "llamacpp"
binary = "{binary}"
path = "{GGUF}"
port = 8102
load_timeout_s = 60
args = ["--threads", "2", "--ctx-size", "512", "--parallel", "1"]
"""


RUNNER = r"""
import json, subprocess, sys, time, urllib.request
n = int(sys.argv[1]); out = {"sparkd": [], "hand": []}
def healthy(port):
    try:
        return urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1).status == 200
    except Exception:
        return False
targets = ["b", "a"]
for i in range(n):
    t = time.perf_counter()
    p = subprocess.run(["sparkctl", "swap", targets[i % 2], "--json"], capture_output=True,
                       text=True)
    wall = (time.perf_counter() - t) * 1000
    if p.returncode != 0:
        sys.exit(f"swap failed: {p.stdout} {p.stderr}")
    done = json.loads(p.stdout.splitlines()[-1])["swap"]
    steps = {s["step"]: s["duration_ms"] for s in done["steps"]}
    out["sparkd"].append({"wall_ms": wall, "daemon_ms": done["duration_ms"], **steps})
# sparkd ends on a (n even); the hand-run swaps alternate the same two units.
units = {"a": ("sparkd-engine@a.service", 8101), "b": ("sparkd-engine@b.service", 8102)}
cur = "a"
for i in range(n):
    nxt = "b" if cur == "a" else "a"
    t = time.perf_counter()
    subprocess.run(["systemctl", "stop", units[cur][0]], check=True)
    subprocess.run(["systemctl", "start", units[nxt][0]], check=True)
    while not healthy(units[nxt][1]):
        time.sleep(0.02)
    out["hand"].append({"wall_ms": (time.perf_counter() - t) * 1000})
    cur = nxt
print(json.dumps(out))
"""


def main() -> int:
    llamacpp = "--llamacpp" in sys.argv[1:]
    with sparkd_container() as box:
        box.exec(["systemctl", "stop", "sparkd", "sparkd-engine@*"])
        if llamacpp:
            box.exec(["mkdir", "-p", str(Path(GGUF).parent)])
            box.exec(["/src/.venv/bin/python", "/src/tests/integration/tiny_gguf.py", GGUF])
        box.exec(["tee", "/etc/sparkd.toml"], input=llamacpp_config() if llamacpp else CONFIG)
        box.exec(["rm", "-f", "/var/lib/sparkd/state.toml"])
        box.exec(["systemctl", "start", "sparkd"])
        box.exec(["sh", "-c", "until sparkctl status --json | grep -q 'a: serving, healthy'; "
                  "do sleep 0.2; done"], timeout=120)
        res = box.exec(["python3", "-c", RUNNER, str(N)], timeout=580)
    data = json.loads(res.stdout)
    overhead = [s["daemon_ms"] - s["stop"] - s["start"] for s in data["sparkd"]]
    sparkd_wall = statistics.median(s["wall_ms"] for s in data["sparkd"])
    hand_wall = statistics.median(s["wall_ms"] for s in data["hand"])
    med = statistics.median(overhead)
    ratio = sparkd_wall / hand_wall
    what = ("a: simulated, load 2 s; b: the real llama-server (tiny GGUF)" if llamacpp else
            f"simulated load {LOAD_S:g} s")
    print(f"machine: {machine()}; {N} swaps each way, {what}, in a booted systemd container")
    print(f"sparkctl swap wall time   median {sparkd_wall:8.1f} ms")
    print(f"hand-run swap wall time   median {hand_wall:8.1f} ms")
    stop = statistics.median(s["stop"] for s in data["sparkd"])
    start = statistics.median(s["start"] for s in data["sparkd"])
    gate = statistics.median(s["health_gate"] for s in data["sparkd"])
    print(f"sparkd steps (median): stop {stop:.1f} ms, start {start:.1f} ms "
          f"(prestart + load + health wait), health gate {gate:.1f} ms")
    print(f"sparkd overhead (swap - stop - start): median {med:.1f} ms, "
          f"max {max(overhead):.1f} ms")
    ok_overhead = med <= OVERHEAD_BAR_MS
    ok_ratio = ratio <= RATIO_BAR
    print(f"bar: overhead median {med:.1f} ms <= {OVERHEAD_BAR_MS:.0f} ms: "
          f"{'MET' if ok_overhead else 'NOT MET'}")
    print(f"bar: sparkctl swap / hand-run = {ratio:.3f} <= {RATIO_BAR}: "
          f"{'MET' if ok_ratio else 'NOT MET'}")
    return 0 if ok_overhead and ok_ratio else 1


if __name__ == "__main__":
    sys.exit(main())
