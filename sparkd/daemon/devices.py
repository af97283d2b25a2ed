"""What sparkd does when a device event changes the machine under it (docs/watch.md, "udev").

The rules are pure (sparkd.monitor.devices); this module keeps their tracks and acts on the
Supervisor. Events arrive from the udev adapter (sparkd.daemon.udev) on the loop thread:

- on battery for `daemon.on_battery_grace_s` with `daemon.on_battery = "stop"`: every engine is
  stopped through systemd (stop jobs: `Restart=` does not bring them back) and the state's
  clean-shutdown marker is written, so a power cut after it is not an unclean boot; the
  desired model stays desired and is started again when mains returns;
- the NVIDIA device removed or unbound: degraded (status, doctor); the engines are stopped
  (an engine on a GPU that is gone would crash and be restarted by systemd in a loop) and
  swaps are refused until the device is bound again, then the desired model starts;
- a volume that holds model files unmounted or its block device removed: swaps are refused
  with that reason until it is back (an engine that runs keeps serving from memory).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, TypedDict

from sparkd.daemon.engines import engine_key
from sparkd.engine.unit import STOP_WAIT_S
from sparkd.errors import SparkdError
from sparkd.journal import event
from sparkd.monitor.devices import (
    DeviceEvent,
    GpuTrack,
    Mount,
    Power,
    PowerAction,
    PowerTrack,
    Supply,
    VolumeTrack,
    gpu_step,
    machine_power,
    parse_mountinfo,
    power_due,
    power_step,
    rewatch,
    supplies_step,
    volume_step,
    volumes_to_watch,
)

if TYPE_CHECKING:
    from sparkd.daemon.supervisor import Supervisor

log = logging.getLogger(__name__)

ReadMounts = Callable[[], str]  # /proc/self/mountinfo's text
BlockPresent = Callable[[str], "bool | None"]  # "MAJ:MIN" -> the block device exists
RETRY_S = 1.0  # a stop or start that must wait for a swap in flight tries again this often


class DeviceRecord(TypedDict):
    """The DaemonRecord fields (sparkd.control.status) this watch fills."""

    degraded: str | None
    swaps_paused: str | None
    on_battery: str | None


class DeviceWatch:
    def __init__(self, *, read_mounts: ReadMounts | None = None,
                 block_present: BlockPresent | None = None) -> None:
        self.read_mounts = read_mounts  # None: no volume watch
        self.block_present = block_present
        self.supplies: dict[str, Supply] = {}
        self.power = PowerTrack()
        self.gpu = GpuTrack()
        self.volumes = VolumeTrack()
        self.held: set[str] = set()  # why sparkd keeps the engines stopped: "power", "gpu"
        self.resume = False  # sparkd stopped the desired model: start it when nothing holds it
        self._timer: asyncio.TimerHandle | None = None

    # -- conditions (status, doctor, the swap refusal) -----------------------------------------

    def degraded(self) -> str | None:
        if not self.gpu.gone:
            return None
        return f"{self.gpu.reason}; engines stopped until it is back"

    def on_battery(self) -> str | None:
        return self.power.reason if self.power.power is Power.BATTERY else None

    def swaps_paused(self) -> str | None:
        """Why a swap is refused now; None when swaps may run."""
        if (volume := self.volumes.reason()) is not None:
            return f"swaps paused: {volume}"
        if self.gpu.gone:
            return f"swaps paused: {self.gpu.reason}"
        if "power" in self.held:
            return f"swaps paused: on battery ({self.power.reason}), engines stopped"
        return None

    def conditions(self) -> list[str]:
        """For the STATUS= line: degraded, else why swaps are paused."""
        said = self.degraded() or self.swaps_paused()
        return [said] if said else []

    def record(self) -> DeviceRecord:
        return {"degraded": self.degraded(), "swaps_paused": self.swaps_paused(),
                "on_battery": self.on_battery()}

    # -- input -----------------------------------------------------------------------------

    def scan(self, sup: Supervisor, devices: Iterable[DeviceEvent]) -> None:
        """The devices there at start: the tracks, and the volumes to watch. Says what is
        already wrong; acts later (`evaluate`), once the Supervisor has started."""
        for ev in devices:
            self.supplies = supplies_step(self.supplies, ev)
            self.gpu, _ = gpu_step(self.gpu, ev)
        power, reason = machine_power(self.supplies)
        self.power = PowerTrack(power, reason, sup.deps.clock() if power is Power.BATTERY
                                else None)
        if power is Power.BATTERY:
            event(log, "power_lost", "on battery at start: %s", reason, level=logging.WARNING)
        self.watch_volumes(sup)

    def rescan(self, sup: Supervisor, devices: Iterable[DeviceEvent]) -> None:
        """After the udev monitor lost events (its socket overflowed): what is there now stands
        in for what they said. The power supplies are read again from scratch (one removed
        meanwhile leaves the table), a known NVIDIA device no longer listed is gone, one
        listed is there, and the volumes are looked at."""
        devices = list(devices)
        event(log, "udev_events_lost", "udev events were lost (the monitor's socket "
              "overflowed); read the %d devices there now instead", len(devices),
              level=logging.WARNING)
        supplies: dict[str, Supply] = {}
        for ev in devices:
            supplies = supplies_step(supplies, ev)
        self.supplies = supplies
        listed = {ev.sys_path for ev in devices}
        for path in sorted(self.gpu.known - listed):
            self.on_event(sup, DeviceEvent("remove", "pci", path, None))
        for ev in devices:
            if ev.subsystem in ("pci", "drm"):
                self.on_event(sup, ev)
        self.evaluate_power(sup)
        self.check_volumes(sup)

    def _mounts(self) -> list[Mount] | None:
        """The mounts now (None: not read here, or the read failed, which is logged)."""
        if self.read_mounts is None:
            return None
        try:
            return parse_mountinfo(self.read_mounts())
        except OSError as exc:
            log.warning("cannot read the mounts: %s", exc)
            return None

    def watch_volumes(self, sup: Supervisor) -> None:
        mounts = self._mounts()
        if mounts is None:
            return
        paths = {m.name: os.path.realpath(m.path) for m in sup.config.supervised_models}
        self.volumes = rewatch(self.volumes, volumes_to_watch(paths, mounts), set(paths))
        self.check_volumes(sup)  # the block devices there now: those that can be lost

    def on_event(self, sup: Supervisor, ev: DeviceEvent) -> None:
        if ev.subsystem == "power_supply":
            self.supplies = supplies_step(self.supplies, ev)
            self.evaluate_power(sup)
        elif ev.subsystem in ("pci", "drm"):
            self.gpu, change = gpu_step(self.gpu, ev)
            if change == "gone":
                event(log, "gpu_gone", "%s: sparkd is degraded; engines stopped, swaps "
                      "paused until it is back", self.gpu.reason, level=logging.ERROR)
                self._hold(sup, "gpu", self.gpu.reason)
            elif change == "back":
                event(log, "gpu_back", "the NVIDIA device is bound again (%s)", ev.sys_path)
                self._release(sup, "gpu", "the NVIDIA device is back")
        elif ev.subsystem == "block":
            self.check_volumes(sup)
        sup.update_status()

    def evaluate_power(self, sup: Supervisor) -> None:
        d = sup.config.daemon
        power, reason = machine_power(self.supplies)
        before = self.power
        self.power, actions = power_step(self.power, power, reason, sup.deps.clock(),
                                         policy=d.on_battery, grace_s=d.on_battery_grace_s)
        for action in actions:
            if action is PowerAction.LOST:
                event(log, "power_lost", "on battery: %s; %s", reason,
                      f"stopping the engines cleanly in {d.on_battery_grace_s:g} s unless "
                      "mains returns" if d.on_battery == "stop" else
                      'daemon.on_battery = "ignore": engines keep running',
                      level=logging.WARNING)
            elif action is PowerAction.STOP:
                since = before.since if before.since is not None else sup.deps.clock()
                self._hold(sup, "power", f"on battery for {sup.deps.clock() - since:.0f} s "
                           f"({reason})")
            elif action is PowerAction.RESTORED:
                event(log, "power_restored", "mains is back: %s", reason)
            elif action is PowerAction.START:
                self._release(sup, "power", "mains is back")
        self._arm_timer(sup)
        sup.update_status()

    def _arm_timer(self, sup: Supervisor) -> None:
        d = sup.config.daemon
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = power_due(self.power, policy=d.on_battery, grace_s=d.on_battery_grace_s)
        if due is not None:
            loop = asyncio.get_running_loop()
            self._timer = loop.call_later(max(0.0, due - sup.deps.clock()),
                                          self.evaluate_power, sup)

    def check_volumes(self, sup: Supervisor) -> None:
        """Look at the mounts (health timer and every block event): unmounting sends no
        uevent, a removed block device does."""
        if not self.volumes.watched:
            return
        mounts = self._mounts()
        if mounts is None:
            return
        present = {}
        if self.block_present is not None:
            for m in mounts:
                if m.point in self.volumes.watched and (
                        found := self.block_present(m.devnum)) is not None:
                    present[m.devnum] = found
        self.volumes, changes = volume_step(self.volumes, mounts, present)
        for point, why in changes:
            models = ", ".join(self.volumes.watched[point])
            if why is not None:
                event(log, "volume_gone", "the volume at %s holding %s is gone (%s): swaps "
                      "paused until it is back", point, models, why, level=logging.ERROR)
            else:
                event(log, "volume_back", "the volume at %s holding %s is back", point, models)
        if changes:
            if self.volumes.reason() is None:
                self._maybe_resume(sup, "the model volume is back")
            sup.update_status()

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    # -- actions ---------------------------------------------------------------------------

    def _hold(self, sup: Supervisor, why: str, reason: str) -> None:
        first = not self.held
        self.held.add(why)
        if first:
            sup.spawn(self._stop_engines(sup, why, reason))
        elif why == "power":
            self._write_clean_marker(sup)

    def _release(self, sup: Supervisor, why: str, reason: str) -> None:
        self.held.discard(why)
        if why == "power" and sup.state.clean_shutdown:
            sup.state = sup.state.replace(clean_shutdown=False)
            sup.save_state()
        self._maybe_resume(sup, reason)

    def _maybe_resume(self, sup: Supervisor, reason: str) -> None:
        if not self.resume or self.held or self.swaps_paused() is not None:
            return
        name = sup.state.desired_model
        self.resume = False
        if name is None or name not in sup.engines:
            return
        try:
            sup.request_swap(name, reason=reason)
        except SparkdError as exc:
            event(log, "engine_start_refused", "cannot start %s after %s: %s", name, reason,
                  exc.message, level=logging.ERROR, SPARKD_MODEL=name)
            return
        event(log, "engines_resumed", "%s: starting %s again", reason, name,
              SPARKD_MODEL=name)

    async def _stop_engines(self, sup: Supervisor, why: str, reason: str) -> None:
        while sup.swap_run is not None:  # a swap in flight ends first (its own steps stop)
            await asyncio.sleep(RETRY_S)
        if not self.held:
            return  # released meanwhile
        running = [v for v in sup.engines.values() if v.unit.running]
        units = [v.unit_name for v in running]
        if any(v.model.name == sup.state.desired_model for v in running):
            self.resume = True
        event(log, "engines_held", "%s: stopping %s", reason, ", ".join(units) or "nothing",
              level=logging.WARNING, SPARKD_REASON=why)
        for v in running:  # shown by status and counted by the metrics (sparkd.daemon.actions)
            sup.watch.actions.record(f"{why}_stop", engine_key(v.model.name, v.variant),
                                     sup.deps.wall_clock(), f"stopped: {reason}")
        jobs = await sup.deps.systemd(lambda m: [m.stop_unit(u) for u in units])
        results = [await sup.wait_job(job, STOP_WAIT_S) for job in jobs]
        await sup.refresh_units([k for k, v in sup.engines.items() if v.unit_name in units])
        event(log, "engines_stopped_for_device", "%s stopped (%s)", ", ".join(units) or "nothing",
              ", ".join(results) or "no job", SPARKD_REASON=why)
        if "power" in self.held:
            self._write_clean_marker(sup)

    def _write_clean_marker(self, sup: Supervisor) -> None:
        """The engines are stopped on battery: a power cut now is not an unclean boot."""
        if not sup.state.clean_shutdown:
            sup.state = sup.state.replace(clean_shutdown=True)
            if sup.save_state():
                event(log, "clean_shutdown_marked", "engines stopped on battery: the "
                      "clean-shutdown marker is written")
