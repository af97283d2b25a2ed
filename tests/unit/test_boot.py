"""Waiting for the GPU at boot: the driver's persistence daemon and NVML, bounded."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from sparkd.daemon.boot import wait_for_gpu
from sparkd.monitor.nvml import FixtureNvml, NvmlSnapshot, read

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"


def h200() -> NvmlSnapshot:
    return read(FixtureNvml(json.loads((FIXTURES / "h200-idle.json").read_text())["captured"]))


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.now += s


def test_waits_for_persistenced_then_nvml() -> None:
    clock = Clock()
    states = iter([("loaded", "activating")] * 4 + [("loaded", "active")] * 10)
    reads = iter([NvmlSnapshot(driver=None, gpus=(), error="NVML: Driver Not Loaded")] * 6
                 + [h200()] * 10)

    async def unit_state(unit: str) -> tuple[str, str]:
        return next(states)

    async def read_gpu() -> NvmlSnapshot:
        return next(reads)

    got = asyncio.run(wait_for_gpu(unit_state=unit_state, read_gpu=read_gpu,
                                   device_present=lambda: True, sleep=clock.sleep,
                                   clock=clock))
    assert got.ready and got.waited_s == 3.0
    assert got.detail == "nvidia-persistenced.service active, NVML answers"


def test_gives_up_after_the_timeout_and_says_why() -> None:
    clock = Clock()

    async def unit_state(unit: str) -> tuple[str, str]:
        return ("loaded", "failed")

    got = asyncio.run(wait_for_gpu(unit_state=unit_state, read_gpu=None,
                                   device_present=lambda: True, sleep=clock.sleep,
                                   clock=clock, timeout_s=5))
    assert not got.ready and got.waited_s >= 5
    assert got.detail == "nvidia-persistenced.service failed"


def test_no_device_no_wait() -> None:
    async def never(unit: str) -> tuple[str, str]:
        raise AssertionError("not asked")

    got = asyncio.run(wait_for_gpu(unit_state=never, read_gpu=None,
                                   device_present=lambda: False, sleep=asyncio.sleep,
                                   clock=lambda: 0.0))
    assert got.ready and got.waited_s == 0.0
