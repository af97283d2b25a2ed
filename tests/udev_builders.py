"""udev events built the way pyudev builds them, for the tests of the udev watch.

`pyudev.Devices.from_environment` builds a Device from a uevent's properties the way libudev
does for a program udev runs: here a child process whose environment is exactly those
properties; sparkd's adapter (`sparkd.daemon.udev.event_of`) copies it out as the rules read
it. Property names and values are the kernel's (tests/unit/test_devices.py says where from);
the NVIDIA device's are the real uevents of the H200 on the GPU machine
(tests/fixtures/udev/h200-nvidia-pci-uevents.json, scripts/capture_udev_events.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

from sparkd.monitor.devices import DeviceEvent

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "udev"
H200: dict[str, Any] = json.loads((FIXTURES / "h200-nvidia-pci-uevents.json").read_text())

BUILD = """
import json, pyudev
from sparkd.daemon.udev import event_of
e = event_of(pyudev.Devices.from_environment(pyudev.Context()))
print(json.dumps([e.action, e.subsystem, e.sys_path, e.driver, dict(e.properties)]))
"""


@cache
def _built(items: tuple[tuple[str, str], ...]) -> DeviceEvent:
    out = subprocess.run([sys.executable, "-c", BUILD], env=dict(items), capture_output=True,
                         text=True, check=True, timeout=60).stdout
    action, subsystem, sys_path, driver, props = json.loads(out)
    return DeviceEvent(action, subsystem, sys_path, driver, props)


def udev(props: dict[str, str]) -> DeviceEvent:
    """The DeviceEvent sparkd's adapter makes of a pyudev Device with these properties."""
    return _built(tuple(sorted({"SEQNUM": "1", **props}.items())))


def supply(name: str, action: str = "change", **props: str) -> DeviceEvent:
    """A power_supply uevent: POWER_SUPPLY_NAME and the given POWER_SUPPLY_<ATTR> values."""
    return udev({"ACTION": action, "SUBSYSTEM": "power_supply",
                 "DEVPATH": f"/devices/platform/test/power_supply/{name}",
                 "POWER_SUPPLY_NAME": name,
                 **{f"POWER_SUPPLY_{k.upper()}": v for k, v in props.items()}})


def h200(written: str, *, drop: tuple[str, ...] = ()) -> DeviceEvent:
    props = dict(next(e for e in H200["events"] if e["written"] == written)["properties"])
    for key in drop:
        props.pop(key)
    return udev(props)
