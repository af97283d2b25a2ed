"""`systemctl reload sparkd`: the administrator's file checked, kept as the accepted config
(durably, or refused), running engines the new config no longer describes stopped, the units
reconciled, and the desired model converged on, behind the usual gates."""

from __future__ import annotations

import asyncio
import logging
from typing import TYPE_CHECKING, Any

from sparkd.config import load_config
from sparkd.control.status import ReloadRecord
from sparkd.daemon.engines import stale_on_reload
from sparkd.engine.linecheck import refuse_bad_lines
from sparkd.engine.unit import STOP_WAIT_S
from sparkd.engine.versions import detect_versions
from sparkd.errors import ConfigError
from sparkd.journal import event
from sparkd.monitor.nvml import compute_capability
from sparkd.units.render import render_units

if TYPE_CHECKING:
    from sparkd.daemon.supervisor import Supervisor

log = logging.getLogger(__name__)


async def reload(sup: Supervisor) -> dict[str, Any]:
    path = sup.config_file
    try:
        new = load_config(path)
        # What parsing cannot check, as check-config does: every engine line against the real
        # parser of its release (detection may run an engine's --version: off the loop), then
        # the units systemd would refuse (binaries, ...).
        versions, capability = await asyncio.get_running_loop().run_in_executor(
            None, lambda: (detect_versions(new.supervised_models), compute_capability().value))
        refuse_bad_lines(new, versions, capability)
        render_units(new, systemd_version=sup.systemd_version, engine_versions=versions,
                     capability=capability)
        # Not accepted unless durable: engines' prestart reads the kept copy.
        sup.deps.accept_config(new)
    except ConfigError as exc:
        sup.last_reload = ReloadRecord(ok=False, message=exc.message,
                                         at=sup.deps.wall_clock())
        event(
            log,
            "config_rejected",
            "new config rejected, keeping the previous one: %s",
            exc.message,
            level=logging.ERROR,
        )
        sup.update_status()
        raise
    sup.config_refused = sup.config_unsaved = None
    for key, why in stale_on_reload(sup.engines, new):
        await stop_for_reload(sup, key, why)
    sup.config = new
    sup.devices.watch_volumes(sup)  # the models' paths may have moved
    await sup.apply_config()
    if sup.state.desired_model not in new.models:
        sup.state = sup.state.replace(desired_model=new.daemon.default_model)
        sup.save_state()
    await sup.converge()
    sup.last_reload = ReloadRecord(ok=True, message="reloaded",
                                     at=sup.deps.wall_clock())
    event(log, "config_reloaded", "config %s reloaded", path)
    sup.update_status()
    return {"config": str(path), "models": sorted(new.models)}


async def stop_for_reload(sup: Supervisor, key: str, why: str) -> None:
    """A running engine the new config no longer describes (its model gone, its port
    moved) is stopped before the reload: never an engine sparkd does not know."""
    view = sup.engines[key]
    unit = view.unit_name
    job = await sup.deps.systemd(lambda m: m.stop_unit(unit))
    result = await sup.wait_job(job, STOP_WAIT_S)
    event(log, "engine_stopped_for_reload", "%s: stopped before the reload: %s (stop job "
          "%s)", key, why, result, level=logging.WARNING if result == "done" else
          logging.ERROR, SPARKD_MODEL=view.model.name)
    await sup.refresh_units([key])
