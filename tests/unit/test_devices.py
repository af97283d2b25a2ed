"""The pure udev rules (sparkd.monitor.devices) over events built the way pyudev builds them.

Events come from real pyudev Devices: `pyudev.Devices.from_environment` builds a Device from
a uevent's properties the way libudev does for a program udev runs (a child process whose
environment is exactly those properties), and sparkd's adapter (`sparkd.daemon.udev.event_of`)
copies it out. Property names and values are the kernel's: POWER_SUPPLY_* from
drivers/power/supply/power_supply_sysfs.c (`power_supply_uevent`: POWER_SUPPLY_NAME, then
POWER_SUPPLY_<ATTRIBUTE> per property) with the values of
Documentation/ABI/testing/sysfs-class-power; the NVIDIA device's are the real uevents of the
H200 on the GPU machine (tests/fixtures/udev/h200-nvidia-pci-uevents.json).
"""

from __future__ import annotations

import pytest
from udev_builders import H200, h200, supply, udev

from sparkd.monitor.devices import (
    DeviceEvent,
    GpuTrack,
    Power,
    PowerAction,
    PowerTrack,
    Supply,
    gpu_step,
    machine_power,
    mount_of,
    nvidia_device,
    parse_mountinfo,
    power_due,
    power_step,
    rewatch,
    supplies_step,
    volume_step,
    volumes_to_watch,
)


def test_the_adapter_reads_a_pyudev_device_as_the_rules_do() -> None:
    ev = supply("AC", type="Mains", online="0")
    assert ev == DeviceEvent("change", "power_supply",
                             "/sys/devices/platform/test/power_supply/AC", None,
                             {"POWER_SUPPLY_NAME": "AC", "POWER_SUPPLY_TYPE": "Mains",
                              "POWER_SUPPLY_ONLINE": "0"})
    gpu = h200("unbind")
    assert (gpu.action, gpu.subsystem, gpu.driver) == ("unbind", "pci", "nvidia")
    assert gpu.sys_path == H200["sys_path"]
    assert gpu.properties["PCI_ID"] == "10DE:2335"


# -- power --------------------------------------------------------------------------------


def table(*events: DeviceEvent) -> dict[str, Supply]:
    supplies: dict[str, Supply] = {}
    for ev in events:
        supplies = supplies_step(supplies, ev)
    return supplies


@pytest.mark.parametrize(("events", "power", "reason"), [
    ((), Power.UNKNOWN, "no mains or UPS supply seen"),
    ((("AC", {"type": "Mains", "online": "1"}),), Power.MAINS, "mains online (AC)"),
    ((("AC", {"type": "Mains", "online": "0"}),), Power.BATTERY, "mains supply AC offline"),
    # Two inputs: one offline is not on battery.
    ((("AC", {"type": "Mains", "online": "0"}), ("AC2", {"type": "Mains", "online": "1"})),
     Power.MAINS, "mains online (AC2)"),
    # A UPS on battery feeds the host's own mains input, which reads online: the UPS wins.
    ((("AC", {"type": "Mains", "online": "1"}),
      ("ups", {"type": "UPS", "online": "1", "status": "Discharging"})),
     Power.BATTERY, "UPS ups on battery (online 1, status Discharging)"),
    ((("ups", {"type": "UPS", "online": "0"}),), Power.BATTERY,
     "UPS ups on battery (online 0, status ?)"),
    ((("ups", {"type": "UPS", "online": "1", "status": "Charging"}),), Power.MAINS,
     "UPS on mains"),
    ((("BAT0", {"type": "Battery", "status": "Discharging"}),), Power.BATTERY,
     "battery BAT0 discharging"),
    # A mouse's battery (scope Device) says nothing about the machine.
    ((("hid-mouse-battery", {"type": "Battery", "status": "Discharging", "scope": "Device"}),),
     Power.UNKNOWN, "no mains or UPS supply seen"),
])
def test_machine_power(events: tuple[tuple[str, dict[str, str]], ...], power: Power,
                       reason: str) -> None:
    supplies = table(*(supply(name, **props) for name, props in events))
    assert machine_power(supplies) == (power, reason)


def test_a_removed_supply_leaves_the_table() -> None:
    supplies = table(supply("AC", type="Mains", online="0"), supply("AC", action="remove"))
    assert machine_power(supplies) == (Power.UNKNOWN, "no mains or UPS supply seen")


def test_power_stops_after_the_grace_and_starts_what_it_stopped() -> None:
    t = PowerTrack(Power.MAINS, "mains online (AC)")
    t, acts = power_step(t, Power.BATTERY, "mains supply AC offline", 100.0, policy="stop",
                         grace_s=30)
    assert acts == (PowerAction.LOST,)
    assert power_due(t, policy="stop", grace_s=30) == 130.0
    t, acts = power_step(t, Power.BATTERY, "mains supply AC offline", 129.9, policy="stop",
                         grace_s=30)
    assert acts == ()
    t, acts = power_step(t, Power.BATTERY, "mains supply AC offline", 130.0, policy="stop",
                         grace_s=30)
    assert acts == (PowerAction.STOP,) and t.stopped
    assert power_due(t, policy="stop", grace_s=30) is None
    t, acts = power_step(t, Power.BATTERY, "mains supply AC offline", 200.0, policy="stop",
                         grace_s=30)
    assert acts == ()  # once per episode
    t, acts = power_step(t, Power.MAINS, "mains online (AC)", 210.0, policy="stop",
                         grace_s=30)
    assert acts == (PowerAction.RESTORED, PowerAction.START)
    assert t == PowerTrack(Power.MAINS, "mains online (AC)")


def test_a_blip_shorter_than_the_grace_stops_nothing() -> None:
    t = PowerTrack(Power.MAINS)
    t, acts = power_step(t, Power.BATTERY, "x", 100.0, policy="stop", grace_s=30)
    t, acts2 = power_step(t, Power.MAINS, "y", 102.0, policy="stop", grace_s=30)
    assert (acts, acts2) == ((PowerAction.LOST,), (PowerAction.RESTORED,))


def test_ignore_says_so_and_never_stops() -> None:
    t = PowerTrack(Power.MAINS)
    t, acts = power_step(t, Power.BATTERY, "x", 100.0, policy="ignore", grace_s=0)
    assert acts == (PowerAction.LOST,)
    assert power_due(t, policy="ignore", grace_s=0) is None
    t, acts = power_step(t, Power.BATTERY, "x", 1e6, policy="ignore", grace_s=0)
    assert acts == () and not t.stopped


def test_no_grace_stops_at_once() -> None:
    _, acts = power_step(PowerTrack(), Power.BATTERY, "x", 5.0, policy="stop", grace_s=0)
    assert acts == (PowerAction.LOST, PowerAction.STOP)


# -- the GPU --------------------------------------------------------------------------------


def test_the_h200s_real_uevents_are_the_nvidia_device() -> None:
    for written in ("change", "unbind", "bind"):
        assert nvidia_device(h200(written))
    # A real unbind is sent after the driver let go, without DRIVER= (constructed: the
    # captured synthetic one still had it); PCI_ID and PCI_CLASS still say what it is.
    assert nvidia_device(h200("unbind", drop=("DRIVER",)))
    other = udev({"ACTION": "remove", "SUBSYSTEM": "pci",
                  "DEVPATH": "/devices/pci0000:00/0000:00:03.0",
                  "PCI_ID": "10DE:1AD8", "PCI_CLASS": "C0330"})  # an NVIDIA USB controller
    assert not nvidia_device(other)


@pytest.mark.parametrize("drop", [(), ("DRIVER",)])
def test_the_gpu_goes_and_comes_back(drop: tuple[str, ...]) -> None:
    scan = DeviceEvent("scan", "pci", H200["sys_path"], "nvidia", {})
    t, change = gpu_step(GpuTrack(), scan)
    assert change is None and not t.gone
    t, change = gpu_step(t, h200("unbind", drop=drop))
    assert change == "gone" and t.gone
    assert t.reason == "NVIDIA device 0000:00:06.0 unbound from its driver (pci)"
    t, change = gpu_step(t, h200("change", drop=("DRIVER",)))  # still unbound
    assert change is None and t.gone
    t, change = gpu_step(t, h200("bind"))
    assert change == "back" and not t.gone and t.reason == ""


def test_a_removed_gpu_with_its_drm_card_comes_back_when_the_pci_device_binds() -> None:
    pci = H200["sys_path"]
    card = DeviceEvent("remove", "drm", f"{pci}/drm/card1", "nvidia", {})
    t, change = gpu_step(GpuTrack(known=frozenset({pci, card.sys_path})), card)
    assert change == "gone"
    t, change = gpu_step(t, DeviceEvent("remove", "pci", pci, None, h200("unbind").properties))
    assert change is None and t.missing == {pci, card.sys_path}
    t, change = gpu_step(t, DeviceEvent("add", "pci", pci, None, {}))  # not bound yet
    assert change is None and t.gone
    t, change = gpu_step(t, DeviceEvent("bind", "pci", pci, "nvidia", {}))
    assert change == "back" and not t.gone


def test_other_devices_leave_the_gpu_alone() -> None:
    t, change = gpu_step(GpuTrack(), DeviceEvent("remove", "pci", "/sys/devices/x", "nvme", {}))
    assert (t, change) == (GpuTrack(), None)
    t, change = gpu_step(GpuTrack(), supply("AC", type="Mains", online="0"))
    assert (t, change) == (GpuTrack(), None)


# -- model volumes --------------------------------------------------------------------------

MOUNTINFO = """\
22 1 252:1 / / rw,relatime shared:1 - ext4 /dev/vda1 rw
23 22 0:21 / /proc rw,nosuid shared:2 - proc proc rw
40 22 259:2 / /srv/models rw,noatime shared:20 - ext4 /dev/nvme1n1p1 rw
41 22 0:45 / /mnt/with\\040space rw shared:21 - tmpfs tmpfs rw
"""


def test_parse_mountinfo() -> None:
    mounts = parse_mountinfo(MOUNTINFO + "garbage line\n")
    assert [(m.point, m.devnum, m.fstype, m.source) for m in mounts] == [
        ("/", "252:1", "ext4", "/dev/vda1"), ("/proc", "0:21", "proc", "proc"),
        ("/srv/models", "259:2", "ext4", "/dev/nvme1n1p1"),
        ("/mnt/with space", "0:45", "tmpfs", "tmpfs")]
    assert mount_of("/srv/models/qwen", mounts).point == "/srv/models"  # type: ignore[union-attr]
    assert mount_of("/srv/modelsx", mounts).point == "/"  # type: ignore[union-attr]


def test_a_volume_goes_and_comes_back() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    track = volumes_to_watch({"qwen": "/srv/models/qwen", "small": "/var/lib/sparkd/models/s",
                              "llama": "/srv/models/llama"}, mounts)
    assert track.watched == {"/srv/models": ("llama", "qwen")}  # the root fs is not watched
    track, changes = volume_step(track, mounts, {"259:2": True})
    assert changes == [] and track.reason() is None
    # The block device went (a USB drive pulled) while still mounted.
    track, changes = volume_step(track, mounts, {"259:2": False})
    assert changes == [("/srv/models", "block device /dev/nvme1n1p1 (259:2) removed")]
    assert track.reason() == ("the volume at /srv/models holding llama, qwen is gone (block "
                              "device /dev/nvme1n1p1 (259:2) removed)")
    unmounted = [m for m in mounts if m.point != "/srv/models"]
    track, changes = volume_step(track, unmounted, {})
    assert changes == [] and "removed" in (track.reason() or "")  # the first reason stays
    # Plugged in again: a new device number, mounted at the same place.
    again = parse_mountinfo(MOUNTINFO.replace("259:2", "259:5"))
    track, changes = volume_step(track, again, {"259:5": True})
    assert changes == [("/srv/models", None)] and track.reason() is None


def test_an_unmount_is_seen() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    track = volumes_to_watch({"qwen": "/srv/models/qwen"}, mounts)
    track, changes = volume_step(track, mounts[:2], {})
    assert changes == [("/srv/models", "unmounted")]


def test_a_reload_keeps_a_gone_volume_gone() -> None:
    mounts = parse_mountinfo(MOUNTINFO)
    track = volumes_to_watch({"qwen": "/srv/models/qwen", "llama": "/srv/models/llama"}, mounts)
    track, _ = volume_step(track, mounts[:2], {})
    # Reloaded while unmounted: the paths now look like the root's; qwen was removed.
    now = volumes_to_watch({"llama": "/srv/models/llama"}, mounts[:2])
    after = rewatch(track, now, {"llama"})
    assert after.watched == {"/srv/models": ("llama",)}
    assert after.reason() == "the volume at /srv/models holding llama is gone (unmounted)"
    assert rewatch(track, now, set()).watched == {}


def test_a_block_device_never_seen_cannot_be_lost() -> None:
    """A container whose /sys lacks the host's disks: the volume is judged by its mount."""
    mounts = parse_mountinfo(MOUNTINFO)
    track = volumes_to_watch({"qwen": "/srv/models/qwen"}, mounts)
    track, changes = volume_step(track, mounts, {"259:2": False})
    assert changes == [] and track.reason() is None
    track, changes = volume_step(track, mounts[:2], {})
    assert changes == [("/srv/models", "unmounted")]
