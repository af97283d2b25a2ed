"""The speculative variant of a model: started beside the plain engine when memory allows,
otherwise not, with the reason in status (the gateway then sends every call to the plain one)."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sparkd.daemon.engines import engine_key
from sparkd.engine.swap import start_afresh, start_timeout
from sparkd.journal import event

if TYPE_CHECKING:
    from sparkd.daemon.supervisor import Supervisor

log = logging.getLogger(__name__)
GIB = 1 << 30


async def start_speculative(sup: Supervisor, name: str) -> None:
    """Start the model's speculative variant beside the plain one when memory allows;
    otherwise say why, and the gateway sends everything to the plain engine."""
    model = sup.config.models.get(name)
    key = engine_key(name, "speculative")
    if model is None or model.speculative is None or key not in sup.engines:
        return
    view = sup.engines[key]
    if view.unit.running or sup.swap_run is not None:
        return
    mem = sup.deps.meminfo()
    need_gib = model.memory_gib_for("speculative") + sup.config.daemon.memory_reserve_gib
    if mem.available < need_gib * GIB:
        view.note = (f"not started: needs {need_gib:g} GiB with the reserve, "
                     f"{mem.available / GIB:.1f} GiB available; every call goes to the "
                     "plain engine")
        event(log, "speculative_skipped", "%s: speculative variant %s", name, view.note,
              level=logging.WARNING, SPARKD_MODEL=name, SPARKD_VARIANT="speculative")
        sup.publish("changed")
        return
    unit = view.unit_name
    event(log, "speculative_starting", "%s: starting the speculative variant", name,
          SPARKD_MODEL=name, SPARKD_VARIANT="speculative")
    result = await sup.wait_job(await sup.deps.systemd(lambda m: start_afresh(m, unit)),
                                 start_timeout(sup.config, name))
    view.note = None if result == "done" else f"failed to start (job {result})"
    if view.note:
        event(log, "speculative_failed", "%s: speculative variant %s", name, view.note,
              level=logging.ERROR, SPARKD_MODEL=name, SPARKD_VARIANT="speculative")
    await sup.refresh_units([key])
