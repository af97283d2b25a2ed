"""The NVML reader against answers captured on a real H200 and a GB10-shaped construction."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from sparkd.monitor.nvml import FixtureNvml, NvmlMonitor, read

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"


def fixture(name: str) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((FIXTURES / name).read_text())
    return doc


def test_h200_under_load_reads_memory_processes_and_utilization() -> None:
    captured = fixture("h200.json")["captured"]
    snap = read(FixtureNvml(captured))
    assert snap.error is None and snap.driver == "580.159.04"
    assert not snap.unified_memory
    (gpu,) = snap.gpus
    raw = captured["devices"][0]
    assert gpu.name == "NVIDIA H200"
    assert gpu.memory_total == raw["nvmlDeviceGetMemoryInfo"]["value"]["total"]
    assert gpu.memory_used == raw["nvmlDeviceGetMemoryInfo"]["value"]["used"]
    assert gpu.utilization_pct == raw["nvmlDeviceGetUtilizationRates"]["value"]["gpu"] > 50
    assert gpu.power_w == raw["nvmlDeviceGetPowerUsage"]["value"] / 1000
    (proc,) = gpu.processes
    assert proc.pid == fixture("h200.json")["load_pid"]
    assert proc.used_bytes is not None and gpu.memory_used is not None
    assert 10 << 30 <= proc.used_bytes <= gpu.memory_used  # the 10 GiB the load held
    assert gpu.unsupported == ()


def test_h200_idle_has_no_processes() -> None:
    snap = read(FixtureNvml(fixture("h200-idle.json")["captured"]))
    assert snap.gpus[0].processes == ()
    assert snap.gpus[0].utilization_pct == 0


def test_gb10_memory_not_supported_is_a_reading_not_a_failure() -> None:
    snap = read(FixtureNvml(fixture("gb10-constructed.json")["captured"]))
    assert snap.error is None
    assert snap.unified_memory  # use /proc/meminfo
    (gpu,) = snap.gpus
    assert gpu.memory_total is None and gpu.memory_used is None
    assert gpu.unsupported == ("memory",)
    assert gpu.process_bytes == 75161927680  # per-process used memory still reports
    assert gpu.to_json()["memory_total_bytes"] is None


def test_no_driver_is_reported_once_with_the_reason() -> None:
    nvml = FixtureNvml({"init_error": "NVML Shared Library Not Found", "devices": []})
    monitor = NvmlMonitor(nvml)
    first, second = monitor.read(), monitor.read()
    assert first.error == second.error == "NVML is not available: NVML Shared Library Not Found"
    assert first.gpus == ()
    monitor.close()


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def test_nvml_not_ready_at_boot_is_tried_again_not_given_up_for_ever() -> None:
    # At boot the driver can come up after sparkd (wait_for_gpu polls read() every 0.5 s for
    # 60 s to wait for it). A first nvmlInit failure was kept for the daemon's life: the
    # wait always ran out, and no GPU reading (liveness's corroboration, desktop presence)
    # ever came.
    captured: dict[str, Any] = {**fixture("h200-idle.json")["captured"],
                                "init_error": "Driver Not Loaded"}
    clock = Clock()
    monitor = NvmlMonitor(FixtureNvml(captured), clock=clock)
    assert monitor.read().error == "NVML is not available: Driver Not Loaded"
    del captured["init_error"]  # the driver is up now
    clock.t += 0.5
    assert monitor.read().error is not None  # not tried again at every read
    clock.t += NvmlMonitor.RETRY_S
    snap = monitor.read()
    assert snap.error is None and snap.gpus[0].name == "NVIDIA H200"
    monitor.close()


class CountingNvml(FixtureNvml):
    inits = 0

    def nvmlInit(self) -> None:
        self.inits += 1
        super().nvmlInit()


def test_a_failed_reading_opens_nvml_again() -> None:
    # A GPU lost and bound again (a driver reload) leaves the old NVML session unusable: a
    # reading that fails closes it, and a later one opens it again.
    captured: dict[str, Any] = json.loads(json.dumps(fixture("h200-idle.json")["captured"]))
    good = captured["devices"][0]["nvmlDeviceGetName"]
    captured["devices"][0]["nvmlDeviceGetName"] = {"error": "NVMLError_GpuIsLost",
                                                   "message": "GPU is lost"}
    clock = Clock()
    nvml = CountingNvml(captured)
    monitor = NvmlMonitor(nvml, clock=clock)
    assert monitor.read().error == "NVML failed: GPU is lost"
    captured["devices"][0]["nvmlDeviceGetName"] = good
    clock.t += NvmlMonitor.RETRY_S
    assert monitor.read().error is None
    assert nvml.inits == 2
    monitor.close()


def test_an_nvml_that_keeps_failing_is_tried_less_often() -> None:
    captured = {"init_error": "Driver Not Loaded", "devices": []}
    clock = Clock()
    nvml = CountingNvml(captured)
    monitor = NvmlMonitor(nvml, clock=clock)
    for _ in range(120):  # a minute of readings every 0.5 s
        monitor.read()
        clock.t += 0.5
    # opened at 0, 2, 6, 14 s, then every 10 s: 24, 34, 44, 54 (8 in 60 s, not 120)
    assert nvml.inits == 8
