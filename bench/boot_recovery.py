"""Bar (issue 12): the time from the container's boot to the gateway answering a chat
completion for the default model, after a power cut with no changed files, is <= 3 s plus
that model's configured load time.

In a booted systemd container with the .deb installed and the shipped config (the default
model `sim-small`, a simulated engine with `--load-seconds 2`), serving through the gateway:
each run cuts the power (SIGKILL to the container's PID 1), boots the same disk again and
times from the start of systemd-nspawn (t0, host wall clock: the container shares the host's
kernel clock) to the first 200 of `POST /v1/chat/completions` through the gateway, polled every
20 ms from inside the container (nsenter; the container has a private network). The
overhead is that time minus the model's load time. With `--timeline`, the journal of each
boot (systemd's unit starts, sparkd's events, prestart's steps, the engine's and the
gateway's first lines) is printed with times relative to t0: where the time goes.

Run as root after `make deb`: `sudo .venv/bin/python bench/boot_recovery.py [--runs N]`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from container import CHAT_POLLER, machine, sparkd_container, wait_serving
from harness import Container

LOAD_S = 2.0  # the shipped sim-small's --load-seconds (etc/sparkd.toml)
MODEL = "sim-small"
OVERHEAD_BAR_S = 3.0


# What the timeline shows: systemd's messages about sparkd's units, and every line of
# sparkd's own processes.
def _wanted(entry: dict[str, str]) -> bool:
    unit = entry.get("UNIT", "") or entry.get("_SYSTEMD_UNIT", "")
    return unit.startswith("sparkd") or "SPARKD_EVENT" in entry


def timeline(box: Container, t0: float) -> list[str]:
    res = box.exec(["journalctl", "-b", "-o", "json", "--no-pager"], timeout=60, quiet=True)
    lines: list[str] = []
    first: float | None = None
    for raw in res.stdout.splitlines():
        entry = json.loads(raw)
        at = int(entry["__REALTIME_TIMESTAMP"]) / 1e6
        if first is None:
            first = at
            lines.append(f"{at - t0:7.3f}  (first journal entry of the boot) "
                         f"{entry.get('MESSAGE', '')}")
        if not _wanted(entry):
            continue
        message = entry.get("MESSAGE", "")
        if isinstance(message, list):  # journald's bytes
            message = bytes(message).decode(errors="replace")
        who = entry.get("SYSLOG_IDENTIFIER", "?")
        tag = entry.get("SPARKD_EVENT", "")
        lines.append(f"{at - t0:7.3f}  {who:<24} {('[' + tag + '] ') if tag else ''}"
                     f"{message[:150]}")
    return lines


def one_run(box: Container, *, show: bool) -> dict[str, float]:
    box.power_cut()
    t0 = time.time()
    box.boot()
    pid1_at = time.time()
    res = box.exec(["python3", "-c", CHAT_POLLER, MODEL, "120"], timeout=150, quiet=True)
    answer = json.loads(res.stdout)
    total = answer["t"] - t0
    if show:
        print("\n".join(timeline(box, t0)))
    box.wait_running()
    wait_serving(box)
    return {"total_s": total, "pid1_s": pid1_at - t0, "tries": answer["tries"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--timeline", action="store_true",
                        help="print each boot's journal timeline (where the time goes)")
    args = parser.parse_args()
    with sparkd_container() as box:
        # The shipped config, the gateway up and a first chat answered: the steady state.
        box.exec(["systemctl", "start", "sparkd-gateway"])
        box.exec(["python3", "-c", CHAT_POLLER, MODEL, "60"], timeout=90, quiet=True)
        runs = []
        for i in range(args.runs):
            run = one_run(box, show=args.timeline)
            runs.append(run)
            print(f"run {i + 1}: boot to first chat completion {run['total_s']:.3f} s "
                  f"(PID 1 found at {run['pid1_s']:.3f} s, {run['tries']} tries)", flush=True)
    totals = [r["total_s"] for r in runs]
    med = statistics.median(totals)
    overhead = med - LOAD_S
    print(f"machine: {machine()}; {args.runs} power cuts and boots of a booted systemd "
          f"container, shipped config ({MODEL}, --load-seconds {LOAD_S:g})")
    print(f"boot to first chat completion: median {med:.3f} s, min {min(totals):.3f} s, "
          f"max {max(totals):.3f} s")
    ok = overhead <= OVERHEAD_BAR_S
    print(f"bar: overhead (median - load {LOAD_S:g} s) {overhead:.3f} s <= "
          f"{OVERHEAD_BAR_S:g} s: {'MET' if ok else 'NOT MET'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
