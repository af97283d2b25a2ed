"""A start of sparkd while engines run with a config file changed since the last accepted
load: `systemctl restart sparkd`, an upgrade, a crash and restart (engines outlive the daemon
unless daemon.stop_engines_on_exit). The engines that the accepted copy (the config they were
started with) describes and the new config no longer does (model or variant gone, port moved)
are stopped first, as a reload does (sparkd.daemon.reloading): never an engine left running
that sparkd does not know (its unit file removed, `not-found active`, its memory and port
held), nor one probed on its new port and restarted as hung."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sparkd.config import Config, load_config
from sparkd.daemon.engines import why_stale
from sparkd.engine.unit import STOP_WAIT_S
from sparkd.errors import ConfigError
from sparkd.journal import event
from sparkd.systemd.manager import SystemdManager, UnitStatus

if TYPE_CHECKING:
    from sparkd.daemon.supervisor import Supervisor

log = logging.getLogger(__name__)


def previous_accepted(config: Config) -> Config | None:
    """The config accepted before this start (what running engines were started with), when
    there is one and it is not `config` itself."""
    path = config.daemon.accepted_config
    if config.source == path or not path.exists():
        return None
    try:
        return load_config(path)
    except ConfigError as exc:  # no engine was started with a copy that does not load
        log.warning("the previous accepted config is unusable: %s", exc.message)
        return None


async def stop_stale_at_start(sup: Supervisor) -> None:
    """Stop (and wait for) each running engine that the previous accepted config started and
    `sup.config` no longer describes; a journal event for each, with why."""
    previous = previous_accepted(sup.config)
    if previous is None:
        return
    for model in previous.supervised_models:
        for variant in model.variants:
            why = why_stale(model, variant, sup.config)
            if why is None:
                continue
            name = model.unit_for(variant)

            def status(m: SystemdManager, name: str = name) -> UnitStatus:
                return m.unit_status(name)

            def stop(m: SystemdManager, name: str = name) -> str:
                return m.stop_unit(name)

            unit = await sup.deps.systemd(status)
            if not unit.running:
                continue
            job = await sup.deps.systemd(stop)
            result = await sup.wait_job(job, STOP_WAIT_S)
            event(log, "engine_stopped_at_start", "%s: stopped at sparkd's start: %s (pid %d; "
                  "stop job %s)", name, why, unit.main_pid, result,
                  level=logging.WARNING if result == "done" else logging.ERROR,
                  SPARKD_MODEL=model.name)
