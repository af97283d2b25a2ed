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
