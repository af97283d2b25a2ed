"""What sparkd watches on the machine between events: the GPU (NVML) and pressure stall
information (PSI), read on the health timer; a desktop starving for memory is said once per
episode (the seed's frozen-desktop disaster shows here before anyone notices)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping

from sparkd.config import DaemonConfig
from sparkd.journal import event
from sparkd.monitor.nvml import NvmlSnapshot
from sparkd.monitor.psi import Pressure

log = logging.getLogger(__name__)


class MachineWatch:
    def __init__(self, *, read_gpu: Callable[[], Awaitable[NvmlSnapshot]] | None,
                 read_pressure: Callable[[], Mapping[str, Pressure]]) -> None:
        self.read_gpu = read_gpu  # None: no GPU readings
        self.read_pressure = read_pressure
        self.gpu: NvmlSnapshot | None = None
        self.pressure: Mapping[str, Pressure] = {}
        self._pressure_warned = False

    async def sample(self, config: DaemonConfig, serving: Callable[[], str | None]) -> None:
        if self.read_gpu is not None:
            self.gpu = await self.read_gpu()
        self.pressure = self.read_pressure()
        self._check_pressure(config.pressure_warn_pct, serving)

    def _check_pressure(self, limit: float, serving: Callable[[], str | None]) -> None:
        """Memory `full` avg10 over the limit: every task stalled, the desktop starves."""
        memory = self.pressure.get("memory")
        if memory is None or memory.full is None:
            return
        stalled = memory.full.avg10
        if stalled > limit and not self._pressure_warned:
            self._pressure_warned = True
            active = serving() or "no engine"
            event(log, "desktop_pressure", "memory pressure: every task stalled %.1f %% of the "
                  "last 10 s (limit %g %%) while %s serves; the desktop is starving", stalled,
                  limit, active, level=logging.WARNING, SPARKD_MODEL=active)
        elif stalled < limit / 2 and self._pressure_warned:
            self._pressure_warned = False
            event(log, "desktop_pressure_cleared", "memory pressure back to %.1f %%", stalled)
