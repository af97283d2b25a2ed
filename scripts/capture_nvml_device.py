"""Capture NVML's device facts as a fixture: compute capability, architecture, display state
and the graphics and compute process lists (run on a machine with an NVIDIA GPU).

    python3 scripts/capture_nvml_device.py > OUT.json

Each answer is recorded as NVML gave it; a call NVML refuses is recorded as
`{"nvml_error": "..."}` rather than left out, so a replay sees the refusal too.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

import pynvml


def _processes(call: Callable[[Any], Any]) -> Callable[[Any], list[dict[str, int]]]:
    def read(handle: Any) -> list[dict[str, int]]:
        return [{"pid": p.pid, "usedGpuMemory": p.usedGpuMemory} for p in call(handle)]
    return read


def _temperature(handle: Any) -> int:
    return int(pynvml.nvmlDeviceGetTemperature(handle, pynvml.NVML_TEMPERATURE_GPU))


READERS: dict[str, Callable[[Any], Any]] = {
    "cuda_compute_capability": pynvml.nvmlDeviceGetCudaComputeCapability,
    "architecture": pynvml.nvmlDeviceGetArchitecture,
    "display_mode": pynvml.nvmlDeviceGetDisplayMode,
    "display_active": pynvml.nvmlDeviceGetDisplayActive,
    "graphics_processes": _processes(pynvml.nvmlDeviceGetGraphicsRunningProcesses),
    "compute_processes": _processes(pynvml.nvmlDeviceGetComputeRunningProcesses),
    "temperature_gpu": _temperature,
    "power_mw": pynvml.nvmlDeviceGetPowerUsage,
}


def main() -> None:
    pynvml.nvmlInit()
    devices: list[dict[str, Any]] = []
    for index in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        device: dict[str, Any] = {"index": index, "name": pynvml.nvmlDeviceGetName(handle)}
        for key, reader in READERS.items():
            try:
                value = reader(handle)
                device[key] = list(value) if isinstance(value, tuple) else value
            except pynvml.NVMLError as error:
                device[key] = {"nvml_error": str(error)}
        devices.append(device)
    json.dump({"driver": pynvml.nvmlSystemGetDriverVersion(),
               "nvml": pynvml.nvmlSystemGetNVMLVersion(),
               "cuda_driver_version": pynvml.nvmlSystemGetCudaDriverVersion(),
               "devices": devices}, sys.stdout, indent=2, default=str)


if __name__ == "__main__":
    main()
