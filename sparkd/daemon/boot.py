"""Before the first engine start of a boot: wait (bounded) for the GPU. After a power cut the
driver's persistence daemon and NVML may come up after sparkd; an engine started before them
fails its CUDA init and burns a start of its start limit. Each wait is a journal event with
its duration. Pure over the callables it is given (the adapters are the composition root's)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sparkd.journal import event
from sparkd.monitor.nvml import NvmlSnapshot

log = logging.getLogger(__name__)

PERSISTENCED = "nvidia-persistenced.service"
GPU_WAIT_S = 60.0
POLL_S = 0.5


@dataclass(frozen=True, slots=True)
class GpuWait:
    ready: bool
    waited_s: float
    detail: str


async def wait_for_gpu(
    *,
    unit_state: Callable[[str], Awaitable[tuple[str, str]]],  # (LoadState, ActiveState)
    read_gpu: Callable[[], Awaitable[NvmlSnapshot]] | None,
    device_present: Callable[[], bool],
    sleep: Callable[[float], Awaitable[None]],
    clock: Callable[[], float],
    timeout_s: float = GPU_WAIT_S,
) -> GpuWait:
    """Wait until nvidia-persistenced (when installed) is active and NVML answers (when an
    NVIDIA device node exists); give up after `timeout_s` and say so. A machine with no NVIDIA
    driver does not wait at all."""
    began = clock()
    if not device_present():
        return GpuWait(ready=True, waited_s=0.0, detail="no NVIDIA device: nothing to wait for")
    detail = ""
    while True:
        load, active = await unit_state(PERSISTENCED)
        persisted = load != "loaded" or active == "active"
        snap = None if read_gpu is None else await read_gpu()
        nvml_ok = snap is None or snap.error is None
        waited = clock() - began
        if persisted and nvml_ok:
            detail = (f"{PERSISTENCED} {active if load == 'loaded' else 'not installed'}, "
                      f"NVML {'answers' if snap is not None else 'not read'}")
            result = GpuWait(ready=True, waited_s=waited, detail=detail)
            break
        detail = (f"{PERSISTENCED} {active}" if not persisted else
                  f"NVML: {snap.error if snap is not None else '?'}")
        if waited >= timeout_s:
            result = GpuWait(ready=False, waited_s=waited, detail=detail)
            break
        await sleep(POLL_S)
    if result.ready:
        event(log, "gpu_ready", "GPU ready after %.1f s: %s", result.waited_s, result.detail,
              SPARKD_DURATION_MS=f"{result.waited_s * 1000:.0f}")
    else:
        event(log, "gpu_wait_timeout", "the GPU is not ready after %.0f s (%s); starting "
              "anyway: the engine's start will tell", result.waited_s, result.detail,
              level=logging.WARNING, SPARKD_DURATION_MS=f"{result.waited_s * 1000:.0f}")
    return result
