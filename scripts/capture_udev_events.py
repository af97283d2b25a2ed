#!/usr/bin/env python3
"""Capture the real uevents of this machine's NVIDIA pci device for the tests
(tests/fixtures/udev/h200-nvidia-pci-uevents.json).

Writing an action to a device's `uevent` file makes the kernel send that uevent for the device
with its real properties and SYNTH_UUID (Documentation/ABI/testing/sysfs-uevent). A synthetic
unbind/bind leaves the driver bound: nothing changes on the device. The uevents are read from
the kernel's netlink group (NETLINK_KOBJECT_UEVENT, group 1) with the standard library alone,
so it runs on a machine without pyudev or udevd. Never send "remove" where udevd runs: it
would act on it (device nodes). Run as root:

    python3 scripts/capture_udev_events.py > tests/fixtures/udev/h200-nvidia-pci-uevents.json
"""

from __future__ import annotations

import glob
import json
import os
import platform
import socket
import sys
from pathlib import Path

NETLINK_KOBJECT_UEVENT = 15
KERNEL_GROUP = 1


def main() -> None:
    s = socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM, NETLINK_KOBJECT_UEVENT)
    s.bind((0, KERNEL_GROUP))
    s.settimeout(5)
    dev = next(os.path.realpath(d) for d in sorted(glob.glob("/sys/bus/pci/devices/*"))
               if Path(d, "vendor").read_text().strip() == "0x10de")
    out: dict[str, object] = {"kernel": platform.release(), "sys_path": dev,
                              "uevent_file": Path(dev, "uevent").read_text()}
    events = []
    for action in ("change", "unbind", "bind"):
        Path(dev, "uevent").write_text(action)
        while True:
            data, addr = s.recvfrom(65536)
            parts = data.split(b"\0")
            props = dict(p.decode().split("=", 1) for p in parts[1:] if b"=" in p)
            if "/sys" + props.get("DEVPATH", "") == dev:
                break
        events.append({"written": action, "header": parts[0].decode(),
                       "sender_pid": addr[0], "properties": props})
    out["events"] = events
    json.dump(out, sys.stdout, indent=1)


if __name__ == "__main__":
    main()
