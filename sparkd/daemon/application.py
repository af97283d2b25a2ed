"""`sparkd daemon`: the composition root. Builds every component, runs the event loop.

One asyncio loop owns the Supervisor. Blocking sd-bus calls run in one dedicated thread (its
connection is used by that thread only); signals arrive on the loop through the signal bus's
file descriptor. The watchdog ping is a task on the same loop, so a stuck loop stops the
pings and systemd restarts sparkd.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

from sparkd.accepted import load_or_fall_back, remove_stale_copies, save_accepted
from sparkd.config import Config
from sparkd.control.server import ControlServer
from sparkd.daemon import metrics
from sparkd.daemon.boot import wait_for_gpu
from sparkd.daemon.events import as_json
from sparkd.daemon.resume import Resumer, can_connect, endpoint_address, models_with_partials
from sparkd.daemon.supervisor import Deps, Notifier, Supervisor, read_boot_id
from sparkd.daemon.udev import UdevMonitor, block_present
from sparkd.daemon.watch import floor_loop
from sparkd.engine.health import models_listed, probe
from sparkd.engine.unit import is_engine_unit
from sparkd.engine.versions import detect_versions
from sparkd.errors import ConfigError, SparkdError, SystemdError
from sparkd.journal import event, setup_logging
from sparkd.monitor.floor import read_available, read_engine_memory
from sparkd.monitor.memory import read_meminfo
from sparkd.monitor.nvml import NvmlMonitor, NvmlSnapshot, compute_capability
from sparkd.monitor.psi import read_pressure
from sparkd.options import config_option
from sparkd.state import StateStore
from sparkd.store.preflight import preflight_verify_async
from sparkd.systemd.bus import PystemdManager, PystemdSignals
from sparkd.systemd.manager import SystemdManager
from sparkd.systemd.notify import SdNotifier
from sparkd.units.reconcile import reconcile
from sparkd.units.render import render_units

if TYPE_CHECKING:
    import aiohttp


log = logging.getLogger(__name__)

T = TypeVar("T")

EXIT_CONFIG = 2
SYSTEMD_CALL_TIMEOUT_S = 60.0
PROBE_TIMEOUT_S = 2.0
METRICS_MAX_BYTES = 4 << 20
JOURNAL_TIMEOUT_S = 10.0
NVML_TIMEOUT_S = 5.0


def watchdog_interval() -> float | None:
    """Half of WATCHDOG_USEC when the watchdog is meant for us, else None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2


def apply_units(
    config: Config, systemd_version: int, reload: Callable[[], None]
) -> Mapping[str, Any]:
    result = reconcile(
        config.daemon.unit_dir,
        # Each engine's unit is rendered for the release installed (sparkd.engine.versions).
        render_units(config, systemd_version=systemd_version,
                     engine_versions=detect_versions(config.supervised_models),
                     capability=compute_capability().value),
        reload=reload,
    )
    return {
        "changed": result.changed,
        "written": list(result.written),
        "removed": list(result.removed),
    }


class Daemon:
    def __init__(self, config: Config, *, config_file: Path, config_refused: str | None = None
                 ) -> None:
        self.config = config
        self.config_file = config_file
        self.config_refused = config_refused
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="systemd")
        self._manager = PystemdManager()
        # NVML from one thread of its own: a slow driver call never delays a systemd call.
        self._nvml_executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="nvml")
        self._nvml = NvmlMonitor()
        self._stop = asyncio.Event()
        self._metrics: metrics.MetricsServer | None = None  # daemon.metrics_listen
        self._metrics_asked: str | None = None  # the address last asked for
        self.notifier: Notifier = SdNotifier()

    async def systemd(self, fn: Callable[[SystemdManager], T]) -> T:
        loop = asyncio.get_running_loop()
        future = loop.run_in_executor(self._executor, fn, self._manager)
        try:
            return await asyncio.wait_for(future, SYSTEMD_CALL_TIMEOUT_S)
        except TimeoutError:
            raise SystemdError(
                f"systemd did not answer within {SYSTEMD_CALL_TIMEOUT_S:g} s"
            ) from None

    async def run(self) -> int:
        import aiohttp

        async with aiohttp.ClientSession() as session:
            return await self._run(session)

    async def _run(self, session: aiohttp.ClientSession) -> int:
        loop = asyncio.get_running_loop()
        # sparkd is the copy's only writer: a temp file of its beside it is from a write that a
        # crash or power cut stopped (the state's are removed by StateStore.load).
        for tmp in remove_stale_copies(self.config):
            log.info("removed %s, the temp file of an accepted-config write cut short", tmp)
        resumer = Resumer()
        deps = Deps(
            systemd=self.systemd,
            apply_units=apply_units,
            store=StateStore(self.config.daemon.state_dir),
            notifier=self.notifier,
            probe=lambda url: probe(url, timeout_s=PROBE_TIMEOUT_S, session=session),
            meminfo=read_meminfo,
            boot_id=read_boot_id(),
            journal_since=self.journal_since,
            read_gpu=self.read_gpu,
            models_listed=lambda url, model: models_listed(session, url, model,
                                                           timeout_s=PROBE_TIMEOUT_S),
            path_exists=Path.exists,
            read_pressure=read_pressure,
            read_available=read_available,
            engine_memory=read_engine_memory,
            scrape_metrics=lambda url: scrape_metrics(session, url),
            verify_files=resumer.guard(preflight_verify_async),
            clock=time.monotonic,
            wall_clock=time.time,
            accept_config=save_accepted,
            read_mounts=lambda: Path("/proc/self/mountinfo").read_text(),
            block_present=block_present,
        )
        sup = Supervisor(self.config, deps, config_file=self.config_file,
                         config_refused=self.config_refused)
        signals = PystemdSignals(unit_filter=is_engine_unit)
        signals.attach(sup.on_systemd_event)
        server = ControlServer(
            self.config.daemon.control_socket,
            group=self.config.daemon.control_group,
            refuse_user=self.config.daemon.engine_user,
            handler=sup.handle,
            streams={"subscribe": lambda _request: as_json(sup.subscribe())},
        )
        tasks: list[asyncio.Task[None]] = []
        udev: UdevMonitor | None = None
        try:
            loop.add_signal_handler(signal.SIGTERM, self._stop.set)
            loop.add_signal_handler(signal.SIGINT, self._stop.set)
            loop.add_signal_handler(signal.SIGHUP, lambda: tasks.append(
                asyncio.create_task(self._reload(sup))))
            interval = watchdog_interval()
            if interval:
                tasks.append(asyncio.create_task(self._watchdog(interval)))
            await server.start()
            await self._follow_metrics(sup)
            await wait_for_gpu(unit_state=self.unit_state, read_gpu=self.read_gpu,
                               device_present=lambda: Path("/dev/nvidiactl").exists(),
                               sleep=asyncio.sleep, clock=time.monotonic)
            udev = self._udev(sup)  # before the start: it knows what is already wrong
            await sup.start()
            if udev is not None:
                udev.start(loop)
                sup.devices.evaluate_power(sup)
            event(log, "daemon_ready", "sparkd ready: %s", sup.status_line())
            if sup.unclean_boot:  # partial downloads: resumed behind the serving model
                tasks.append(asyncio.create_task(self._resume(sup, resumer)))
            tasks.append(asyncio.create_task(self._health_loop(sup, signals)))
            tasks.append(asyncio.create_task(floor_loop(sup)))
            await self._stop.wait()
            event(log, "daemon_stopping", "sparkd stopping")
            await sup.shutdown()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            await server.close()
            if self._metrics is not None:
                await self._metrics.close()
            signals.close()
            if udev is not None:
                udev.close()
            sup.devices.close()
            await asyncio.get_running_loop().run_in_executor(self._executor, self._manager.close)
            self._executor.shutdown(wait=True)
            await loop.run_in_executor(self._nvml_executor, self._nvml.close)
            self._nvml_executor.shutdown(wait=True)
        return 0

    def _udev(self, sup: Supervisor) -> UdevMonitor | None:
        """The udev monitor (power supplies, the NVIDIA device, block devices) and what it
        sees now; None, said once, where none can be opened (no netlink, no libudev)."""
        try:
            udev = UdevMonitor(lambda ev: sup.devices.on_event(sup, ev))
            sup.devices.scan(sup, udev.scan())
        except (ImportError, OSError) as exc:
            event(log, "udev_unavailable", "no udev events (%s): power, GPU removal and "
                  "model volumes are not watched", exc, level=logging.WARNING)
            sup.devices.watch_volumes(sup)  # unmounts are still seen on the health timer
            return None
        return udev

    async def unit_state(self, unit: str) -> tuple[str, str]:
        def read(m: SystemdManager) -> tuple[str, str]:
            status = m.unit_status(unit)
            return status.load_state, status.active_state

        return await self.systemd(read)

    async def read_gpu(self) -> NvmlSnapshot:
        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._nvml_executor, self._nvml.read), NVML_TIMEOUT_S
            )
        except TimeoutError:
            return NvmlSnapshot(driver=None, gpus=(), error="NVML did not answer in time")

    async def journal_since(self, unit: str, since: float) -> list[str]:
        """The unit's journal lines since `since` (Unix time), from journalctl."""
        argv = ["journalctl", "-u", unit, f"--since=@{int(since) - 1}", "-o", "cat",
                "--no-pager", "-q"]
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL
            )
            out, _ = await asyncio.wait_for(proc.communicate(), JOURNAL_TIMEOUT_S)
        except (OSError, TimeoutError) as exc:
            log.warning("reading the journal of %s failed: %s", unit, exc)
            return []
        return out.decode(errors="replace").splitlines()

    async def _resume(self, sup: Supervisor, resumer: Resumer) -> None:
        from sparkd.store import hub

        host, port = endpoint_address(hub.endpoint())
        await resumer.run(
            sup.config, skip={m for m in (sup.state.desired_model, sup.active_model()) if m},
            verify=preflight_verify_async,
            find=lambda config, skip: asyncio.to_thread(models_with_partials, config, skip),
            connect=lambda: can_connect(host, port), sleep=asyncio.sleep,
            clock=time.monotonic)

    async def _follow_metrics(self, sup: Supervisor) -> None:
        """The metrics endpoint the config asks for: at start, and on the health tick after
        a reload (SIGHUP or the control socket's) changed daemon.metrics_listen."""
        listen = sup.config.daemon.metrics_listen
        if listen != self._metrics_asked:
            self._metrics_asked = listen
            self._metrics = await metrics.follow(self._metrics, listen, sup.status)

    async def _reload(self, sup: Supervisor) -> None:
        with contextlib.suppress(SparkdError):
            await sup.reload()

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.notify("WATCHDOG=1")
            await asyncio.sleep(interval)

    async def _health_loop(self, sup: Supervisor, signals: PystemdSignals) -> None:
        while True:
            await asyncio.sleep(sup.config.daemon.health_interval_s)
            # Unit state comes from signals; this only picks up a message sd-bus may have
            # buffered without the fd becoming readable again. No D-Bus traffic.
            signals.drain()
            await self._follow_metrics(sup)
            try:
                await sup.check_health()
            except SparkdError as exc:
                log.warning("periodic check failed: %s", exc)


async def scrape_metrics(session: aiohttp.ClientSession, url: str) -> str | None:
    """An engine's /metrics text; None for no answer, a non-200 or more than 4 MiB (the
    liveness rule reads None as unknown, never as zero)."""
    import aiohttp

    try:
        async with session.get(url, timeout=aiohttp.ClientTimeout(total=PROBE_TIMEOUT_S),
                               allow_redirects=False) as response:
            if response.status != 200:
                return None
            body = await response.content.read(METRICS_MAX_BYTES + 1)
    except (aiohttp.ClientError, TimeoutError):
        return None
    if len(body) > METRICS_MAX_BYTES:
        return None
    return body.decode("utf-8", errors="replace")


@click.command("daemon")
@config_option
@click.option("--debug", is_flag=True, help="Log debug messages.")
def command(config_file: Path, *, debug: bool) -> None:
    """Run the supervisor (started by sparkd.service)."""
    setup_logging("sparkd", debug=debug)
    try:
        loaded = load_or_fall_back(config_file.absolute())
    except ConfigError as exc:
        # No accepted config to run on: fail once (sparkd.service does not restart on this
        # status), with the fix.
        log.error("%s", exc.message)
        sys.exit(EXIT_CONFIG)
    try:
        sys.exit(asyncio.run(Daemon(loaded.config, config_file=config_file.absolute(),
                                    config_refused=loaded.refused).run()))
    except SparkdError as exc:
        log.error("sparkd failed: %s", exc.message)
        sys.exit(1)
