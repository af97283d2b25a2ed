"""Bar (issue 12): stop and restart of sparkd and of the gateway finish within 2 s with
clients connected, side by side with the floor that systemd and a Python start impose.

In a booted systemd container with the .deb installed and the shipped config (the default
model `sim-small` serving through the gateway), a helper unit inside the container keeps three
clients connected and reconnects each as soon as it is dropped: a subscriber on sparkd's
control socket (the `subscribe` event stream, as the gateway and `sparkctl swap` hold one), an
idle keep-alive HTTP connection to the gateway, and a streaming chat completion through the
gateway (long enough to outlast each run). With all three connected, each run times, from
inside the container (no nsenter in the figure), the whole `systemctl restart UNIT` and then
`systemctl stop UNIT` (and the `systemctl start` that follows, reported but not a bar) of:

- `sparkd.service`, then `sparkd-gateway.service`;
- the baseline `floor.service`: a minimal Type=notify service run by the same interpreter with
  the same flags (`/usr/bin/python3 -I`), which imports nothing beyond `socket` and `signal`,
  sends READY=1 at once and exits on SIGTERM. Its restart is the floor: systemd's own work plus
  a Python start. The ratio is each unit's median over the floor's.

Type=notify: `systemctl restart` returns when the new process sent READY=1, so the figure is
the stop, the exec and everything sparkd or the gateway does before READY=1. With `--timeline`,
each unit's last restart is broken down from the journal (systemd's Stopping/Stopped/Starting/
Started lines and the unit's own first lines).

Run as root after `make deb`: `sudo .venv/bin/python bench/stop_restart.py [--runs N]`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "system"))

from clients import clients, start_clients, timed, wait_connected
from container import machine, sparkd_container, wait_serving
from harness import Container

BAR_S = 2.0
UNITS = ("sparkd.service", "sparkd-gateway.service", "floor.service")
MODEL = "sim-small"

FLOOR_UNIT = """[Unit]
Description=bench floor: a minimal Type=notify python service

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/bin/python3 -I /usr/local/lib/floor.py
"""

FLOOR = r"""
import os, signal, socket, sys
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
address = os.environ["NOTIFY_SOCKET"]
if address.startswith("@"):
    address = "\0" + address[1:]
sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
sock.sendto(b"READY=1", address)
while True:
    signal.pause()
"""

def settle(box: Container, unit: str) -> None:
    """The unit is back and every client connected again (sparkd serving, for sparkd)."""
    box.wait_unit_active(unit)
    if unit == "sparkd.service":
        wait_serving(box)
    wait_connected(box)


def timeline(box: Container, unit: str, since: float) -> list[str]:
    """The unit's restart begun at wall time `since`, from the journal, relative to its
    Stopping line."""
    out = box.exec(["journalctl", "-b", "-u", unit, "-o", "json", "--no-pager", "-n", "400"],
                   quiet=True).stdout
    entries = [json.loads(line) for line in out.splitlines()]
    chosen = next((i for i, e in enumerate(entries)
                   if int(e["__REALTIME_TIMESTAMP"]) / 1e6 >= since
                   and str(e.get("MESSAGE", "")).startswith("Stopping ")), None)
    if chosen is None:
        return []
    t0 = int(entries[chosen]["__REALTIME_TIMESTAMP"]) / 1e6
    lines = []
    for entry in entries[chosen:chosen + 14]:
        at = int(entry["__REALTIME_TIMESTAMP"]) / 1e6
        message = entry.get("MESSAGE", "")
        if isinstance(message, list):
            message = bytes(message).decode(errors="replace")
        lines.append(f"  {at - t0:6.3f}  {entry.get('SYSLOG_IDENTIFIER', '?'):<14} "
                     f"{str(message)[:110]}")
        if str(message).startswith("Started "):
            break
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--timeline", action="store_true",
                        help="print each unit's last restart from the journal")
    args = parser.parse_args()
    load_before = os.getloadavg()
    results: dict[str, dict[str, list[float]]] = {
        unit: {"restart": [], "stop": [], "start": []} for unit in UNITS}
    restart_at: dict[str, float] = {}
    with sparkd_container() as box:
        box.exec(["systemctl", "start", "sparkd-gateway"])
        box.exec(["sh", "-c", "cat > /usr/local/lib/floor.py"], input=FLOOR)
        box.exec(["sh", "-c", "cat > /etc/systemd/system/floor.service"], input=FLOOR_UNIT)
        box.exec(["systemctl", "daemon-reload"])
        box.exec(["systemctl", "start", "floor.service"])
        start_clients(box)
        for run in range(args.runs):
            for unit in UNITS:
                # Two starts a run: keep under StartLimitBurst= (10 in 5 min), untimed.
                box.exec(["systemctl", "reset-failed", unit], check=False, quiet=True)
                for action in ("restart", "stop", "start"):
                    if action != "start":
                        wait_connected(box)
                    if action == "restart":
                        restart_at[unit] = time.time()
                    results[unit][action].append(timed(box, action, unit))
                    if action != "stop":
                        settle(box, unit)
            print(f"run {run + 1}: " + "; ".join(
                f"{unit.split('.')[0]} restart {results[unit]['restart'][-1]:.3f} s, "
                f"stop {results[unit]['stop'][-1]:.3f} s" for unit in UNITS), flush=True)
        if args.timeline:
            for unit in UNITS:
                print(f"{unit}: its last restart, from the journal")
                print("\n".join(timeline(box, unit, restart_at[unit])))
        connections = clients(box)["connections"]
    load_after = os.getloadavg()
    floor = {action: statistics.median(results["floor.service"][action])
             for action in ("restart", "stop", "start")}
    print(f"machine: {machine()}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after; {args.runs} runs; client connections made: "
          f"{connections}")
    print("| unit | restart median (max) | ratio to floor | stop median (max) "
          "| start median | bar: restart and stop <= 2 s |")
    print("| --- | --- | --- | --- | --- | --- |")
    met = True
    for unit in UNITS:
        r, s, st = (results[unit][a] for a in ("restart", "stop", "start"))
        ok = max(r) <= BAR_S and max(s) <= BAR_S
        if unit != "floor.service":
            met = met and ok
        print(f"| {unit} | {statistics.median(r):.3f} s ({max(r):.3f} s) | "
              f"{statistics.median(r) / floor['restart']:.2f}x | "
              f"{statistics.median(s):.3f} s ({max(s):.3f} s) | {statistics.median(st):.3f} s | "
              f"{'met' if ok else 'NOT MET'} |")
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
