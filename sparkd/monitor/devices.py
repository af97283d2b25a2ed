"""PURE: what a udev event means to sparkd, and what sparkd does about it (docs/watch.md, "udev").

Three conditions, each a small track of values with its reason as text, stepped by events:

- **power** (`power_supply` devices): mains, or on battery. A power supply's uevent carries
  `POWER_SUPPLY_NAME` and one `POWER_SUPPLY_<ATTRIBUTE>` per property it has
  (drivers/power/supply/power_supply_sysfs.c, `power_supply_uevent`); the attributes are those
  of Documentation/ABI/testing/sysfs-class-power: `type` (Battery, UPS, Mains, USB, ...),
  `online` (0 offline, 1 online fixed, 2 online programmable), `status` (Unknown, Charging,
  Discharging, Not charging, Full), `scope` (Unknown, System, Device: a mouse's battery is
  Device scope and says nothing about the machine's power).
- **gpu** (`pci` and `drm` devices bound to the driver `nvidia`): present, or gone. A pci
  device's uevent carries `PCI_ID=VVVV:DDDD` and `PCI_CLASS` (`%04X` of the 24-bit class:
  `30000` VGA, `30200` 3D controller; drivers/pci/pci-driver.c `pci_uevent`), and the driver
  core adds `DRIVER=` while a driver is bound (drivers/base/core.c `dev_uevent`).
- **volumes**: the mounts that hold the models' files, from /proc/self/mountinfo
  (Documentation/filesystems/proc.rst, 3.5) and whether their block device is still there.

    power:   unknown/mains ──supply offline/discharging──▶ battery
             battery ──grace over, on_battery = "stop"──▶ battery (engines stopped)
             battery ──mains back──▶ mains (engines stopped by sparkd: started again)
    gpu:     present ──nvidia device removed/unbound──▶ gone ──nvidia device bound──▶ present
    volume:  mounted ──unmounted, block device gone──▶ gone ──mounted, device there──▶ mounted
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Final, Literal

OnBattery = Literal["stop", "ignore"]
ON_BATTERY: Final[tuple[OnBattery, ...]] = ("stop", "ignore")
NVIDIA_VENDOR: Final = "10DE"
NVIDIA_DRIVER: Final = "nvidia"
# Display controllers (VGA 0x0300xx, 3D 0x0302xx): pci class >> 16 == 0x03.
DISPLAY_CLASS: Final = 0x03
SUBSYSTEMS: Final = ("power_supply", "pci", "drm", "block")
GONE_ACTIONS: Final = frozenset({"remove", "unbind"})
HERE_ACTIONS: Final = frozenset({"add", "bind", "change", "scan"})


@dataclass(frozen=True, slots=True)
class DeviceEvent:
    """One udev event (or, with action "scan", one device listed at start), as the adapter
    (sparkd.daemon.udev) copies it out of a pyudev Device."""

    action: str
    subsystem: str
    sys_path: str
    driver: str | None  # the device's driver, or for a drm device its parent's
    properties: Mapping[str, str] = field(default_factory=dict)


# -- power ----------------------------------------------------------------------------------


class Power(enum.StrEnum):
    UNKNOWN = "unknown"  # no power supply that says anything (a Spark with no UPS in udev)
    MAINS = "mains"
    BATTERY = "battery"


@dataclass(frozen=True, slots=True)
class Supply:
    name: str
    kind: str  # POWER_SUPPLY_TYPE
    online: str | None
    status: str | None
    scope: str | None


def supply_of(ev: DeviceEvent) -> Supply | None:
    """A power_supply event's reading; None for any other device."""
    if ev.subsystem != "power_supply":
        return None
    p = ev.properties
    name = p.get("POWER_SUPPLY_NAME") or ev.sys_path.rstrip("/").rsplit("/", 1)[-1]
    return Supply(name, p.get("POWER_SUPPLY_TYPE", "Unknown"), p.get("POWER_SUPPLY_ONLINE"),
                  p.get("POWER_SUPPLY_STATUS"), p.get("POWER_SUPPLY_SCOPE"))


def on_battery(s: Supply) -> str | None:
    """Why this supply says the machine runs on battery; None when it does not."""
    if s.kind == "UPS" and (s.online == "0" or s.status == "Discharging"):
        return (f"UPS {s.name} on battery (online {s.online or '?'}, status "
                f"{s.status or '?'})")
    if s.kind == "Mains" and s.online == "0":
        return f"mains supply {s.name} offline"
    if s.kind == "Battery" and s.scope != "Device" and s.status == "Discharging":
        return f"battery {s.name} discharging"
    return None


def machine_power(supplies: Mapping[str, Supply]) -> tuple[Power, str]:
    """The machine's power from every supply seen, with the reason. A UPS on battery wins (the
    host's own mains input is fed by the UPS and reads online); else mains is lost when every
    Mains supply is offline; else a system battery discharging."""
    ups = [r for s in supplies.values() if s.kind == "UPS" and (r := on_battery(s))]
    if ups:
        return Power.BATTERY, ups[0]
    mains = [s for s in supplies.values() if s.kind == "Mains"]
    if mains:
        off = [r for s in mains if (r := on_battery(s))]
        if len(off) == len(mains):
            return Power.BATTERY, off[0]
        return Power.MAINS, "mains online (" + ", ".join(
            s.name for s in mains if on_battery(s) is None) + ")"
    battery = [r for s in supplies.values() if s.kind == "Battery" and (r := on_battery(s))]
    if battery:
        return Power.BATTERY, battery[0]
    if any(s.kind == "UPS" for s in supplies.values()):
        return Power.MAINS, "UPS on mains"
    return Power.UNKNOWN, "no mains or UPS supply seen"


def supplies_step(supplies: Mapping[str, Supply], ev: DeviceEvent) -> dict[str, Supply]:
    """The table of supplies after one event: a removed supply leaves it."""
    out = dict(supplies)
    s = supply_of(ev)
    if s is None:
        return out
    if ev.action == "remove":
        out.pop(s.name, None)
    else:
        out[s.name] = s
    return out


class PowerAction(enum.StrEnum):
    LOST = "lost"  # say so
    STOP = "stop"  # stop the engines cleanly, write the clean-shutdown marker
    RESTORED = "restored"  # say so
    START = "start"  # start the desired model again (sparkd stopped it)


@dataclass(frozen=True, slots=True)
class PowerTrack:
    power: Power = Power.UNKNOWN
    reason: str = ""
    since: float | None = None  # on battery since (clock seconds)
    stopped: bool = False  # sparkd stopped the engines for it


def power_step(track: PowerTrack, power: Power, reason: str, now: float, *,
               policy: OnBattery, grace_s: float) -> tuple[PowerTrack, tuple[PowerAction, ...]]:
    """One evaluation (an event, or the grace timer). Stops once per episode, after the power
    has stayed on battery for `grace_s` (a blip does not stop a model that took minutes to
    load); starts again only what it stopped."""
    actions: list[PowerAction] = []
    if power is Power.BATTERY:
        if track.power is not Power.BATTERY:
            track = PowerTrack(power, reason, now, track.stopped)
            actions.append(PowerAction.LOST)
        else:
            track = replace(track, reason=reason)
        assert track.since is not None
        if policy == "stop" and not track.stopped and now - track.since >= grace_s:
            track = replace(track, stopped=True)
            actions.append(PowerAction.STOP)
        return track, tuple(actions)
    if track.power is Power.BATTERY:
        actions.append(PowerAction.RESTORED)
    if track.stopped:
        actions.append(PowerAction.START)
    return PowerTrack(power, reason, None, stopped=False), tuple(actions)


def power_due(track: PowerTrack, *, policy: OnBattery, grace_s: float) -> float | None:
    """When the grace timer must evaluate again (clock seconds); None: no timer needed."""
    if track.power is not Power.BATTERY or track.stopped or policy != "stop":
        return None
    assert track.since is not None
    return track.since + grace_s


# -- the GPU --------------------------------------------------------------------------------


def nvidia_device(ev: DeviceEvent) -> bool:
    """Bound to the nvidia driver, or (its driver gone, on unbind/remove) a pci display
    controller of NVIDIA's vendor id."""
    if ev.driver == NVIDIA_DRIVER:
        return True
    if ev.subsystem != "pci":
        return False
    vendor, _, _ = ev.properties.get("PCI_ID", "").partition(":")
    try:
        cls = int(ev.properties.get("PCI_CLASS", ""), 16)
    except ValueError:
        return False
    return vendor.upper() == NVIDIA_VENDOR and cls >> 16 == DISPLAY_CLASS


@dataclass(frozen=True, slots=True)
class GpuTrack:
    known: frozenset[str] = frozenset()  # sys paths of nvidia devices seen bound
    missing: frozenset[str] = frozenset()  # removed or unbound, not back
    reason: str = ""

    @property
    def gone(self) -> bool:
        return bool(self.missing)


def _related(a: str, b: str) -> bool:
    """One is the other or below it: a pci device and its drm cards."""
    return a == b or a.startswith(b.rstrip("/") + "/") or b.startswith(a.rstrip("/") + "/")


def gpu_step(track: GpuTrack, ev: DeviceEvent) -> tuple[GpuTrack, Literal["gone", "back"] | None]:
    """The GPU after one pci/drm event, and whether it just went or came back."""
    if ev.subsystem not in ("pci", "drm"):
        return track, None
    if ev.action in GONE_ACTIONS and (ev.sys_path in track.known or nvidia_device(ev)):
        what = ev.properties.get("PCI_SLOT_NAME") or ev.sys_path.rsplit("/", 1)[-1]
        how = "removed" if ev.action == "remove" else "unbound from its driver"
        was_gone = track.gone
        track = GpuTrack(track.known - {ev.sys_path}, track.missing | {ev.sys_path},
                         track.reason if was_gone else
                         f"NVIDIA device {what} {how} ({ev.subsystem})")
        return track, None if was_gone else "gone"
    if ev.action in HERE_ACTIONS and ev.driver == NVIDIA_DRIVER:
        missing = frozenset(m for m in track.missing if not _related(m, ev.sys_path))
        back = track.gone and not missing
        return GpuTrack(track.known | {ev.sys_path}, missing,
                        "" if not missing else track.reason), "back" if back else None
    return track, None


# -- model volumes --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Mount:
    point: str
    devnum: str  # "MAJOR:MINOR" as mountinfo writes it
    fstype: str
    source: str


def _unescape(field_: str) -> str:
    """mountinfo writes space, tab, newline and backslash as octal escapes (\\040...)."""
    out, i = [], 0
    while i < len(field_):
        c = field_[i]
        if c == "\\" and field_[i + 1:i + 4].isdigit() and len(field_[i + 1:i + 4]) == 3:
            out.append(chr(int(field_[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(c)
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """/proc/self/mountinfo: `ID PARENT MAJ:MIN ROOT POINT OPTIONS [OPTIONAL...] - FSTYPE
    SOURCE SUPER`. Lines that do not fit are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        dash = fields.index("-", 6)
        if dash + 2 >= len(fields):
            continue
        mounts.append(Mount(_unescape(fields[4]), fields[2], fields[dash + 1],
                            _unescape(fields[dash + 2])))
    return mounts


def mount_of(path: str, mounts: Iterable[Mount]) -> Mount | None:
    """The mount that holds `path` (absolute, resolved): the longest mount point above it; of
    mounts stacked on one point, the last (the one visible)."""
    best: Mount | None = None
    for m in mounts:
        prefix = m.point.rstrip("/") + "/"
        if (path == m.point or path.startswith(prefix) or m.point == "/") and (
                best is None or len(m.point) >= len(best.point)):
            best = m
    return best


@dataclass(frozen=True, slots=True)
class VolumeTrack:
    """The mounts holding model files (mount point -> the models on it) and those gone."""

    watched: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    gone: Mapping[str, str] = field(default_factory=dict)  # mount point -> why
    # Block devices seen present: only one that was there can be lost (a container whose
    # /sys lacks the host's disks must not read every volume as gone).
    seen: frozenset[str] = frozenset()

    def reason(self) -> str | None:
        if not self.gone:
            return None
        point, why = sorted(self.gone.items())[0]
        models = ", ".join(self.watched.get(point, ()))
        return f"the volume at {point} holding {models} is gone ({why})"


def volumes_to_watch(model_paths: Mapping[str, str], mounts: Iterable[Mount]) -> VolumeTrack:
    """Which mounts hold which models' files, at start. A model on the root filesystem is not
    watched: nothing could unmount it under a running machine."""
    mounts = list(mounts)
    watched: dict[str, list[str]] = {}
    for model, path in sorted(model_paths.items()):
        m = mount_of(path, mounts)
        if m is not None and m.point != "/":
            watched.setdefault(m.point, []).append(model)
    return VolumeTrack({p: tuple(ms) for p, ms in watched.items()})


def rewatch(before: VolumeTrack, now: VolumeTrack, models: set[str]) -> VolumeTrack:
    """The volumes to watch after a reload: those found now, and those gone before that still
    hold a configured model (unmounted, their models' paths now look like the root's)."""
    watched = dict(now.watched)
    gone: dict[str, str] = {}
    for point, why in before.gone.items():
        still = tuple(m for m in before.watched.get(point, ()) if m in models)
        if still:
            watched[point] = tuple(sorted(set(watched.get(point, ())) | set(still)))
            gone[point] = why
    return VolumeTrack(watched, gone, before.seen)


VolumeChange = tuple[str, str | None]  # (mount point, why it is gone; None: back)


def volume_step(track: VolumeTrack, mounts: Iterable[Mount],
                block_present: Mapping[str, bool]) -> tuple[VolumeTrack, list[VolumeChange]]:
    """The volumes after one look at the mounts and at whether each mount's block device still
    exists (`block_present`: devnum -> present; a devnum not in it, such as an NFS or tmpfs
    mount's, has no block device to lose, nor has one never seen present). Returns the
    changes: (mount point, why it is gone, or None when it is back)."""
    visible: dict[str, Mount] = {}
    for m in mounts:
        visible[m.point] = m  # the last mount on a point is the one seen
    seen = track.seen | {devnum for devnum, here in block_present.items() if here}
    gone: dict[str, str] = {}
    for point in track.watched:
        mount = visible.get(point)
        if mount is None:
            gone[point] = "unmounted"
        elif mount.devnum in seen and block_present.get(mount.devnum) is False:
            gone[point] = f"block device {mount.source} ({mount.devnum}) removed"
    changes: list[VolumeChange] = [
        (p, why) for p, why in sorted(gone.items()) if p not in track.gone]
    changes += [(p, None) for p in sorted(track.gone) if p not in gone]
    # A volume stays gone with the first reason seen for it.
    return VolumeTrack(track.watched, {p: track.gone.get(p, why) for p, why in gone.items()},
                       seen), changes
