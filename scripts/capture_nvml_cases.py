"""Capture NVML time series for the liveness rule's fixtures (run on a machine with an NVIDIA GPU).

For each case a workload process starts (none for idle), warms up, prints `ready`, and then
prints `progress N` lines as it completes work (N plays the engine's generated-token counter).
Meanwhile this script records, every `--interval` seconds for `--seconds`, every NVML answer
sparkd's reader uses in the exact `sparkd.monitor.nvml.capture()` format (each sample's
`captured` replays through `FixtureNvml`), plus what the reader does not ask for but the case
needs: memory utilization is already inside `nvmlDeviceGetUtilizationRates`; clocks, the
performance state and the energy counter go under `extra`. Each case becomes one JSON file,
`h200-<case>.json` on an H200, with the workload's exact source in it.

    python3 scripts/capture_nvml_cases.py --out DIR [--seconds 20] [--interval 0.5] [CASE ...]

Cases: idle-cold (nothing running, cold), decode (batch-1 bf16 matrix-vector products streaming
8 GiB of weights: memory-bound), matmul (8192^3 bf16 matrix products: compute-bound), spin and
spin-few (a kernel busy-waiting on a device-memory flag that never changes, on every SM / on 8
blocks like a collective's channels; a deadline read from %globaltimer ends it, so it can never
wedge the GPU), idle-warm (nothing running, right after the others).

Needs pynvml (nvidia-ml-py), and torch (decode, matmul) or cupy (spin) in the python running it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any, Final


def _repo_root() -> Path:
    """The checkout holding sparkd (this file may travel to the GPU machine in a side folder)."""
    for parent in Path(__file__).resolve().parents:
        if (parent / "sparkd" / "monitor" / "nvml.py").is_file():
            return parent
    raise SystemExit("cannot find sparkd/monitor/nvml.py above this script")


sys.path.insert(0, str(_repo_root()))

import pynvml  # noqa: E402

from sparkd.monitor.nvml import capture  # noqa: E402

MATMUL: Final = r"""
import sys, time, torch
seconds = float(sys.argv[1])
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
b = torch.randn_like(a)
c = torch.empty_like(a)
for _ in range(5):
    torch.matmul(a, b, out=c)
torch.cuda.synchronize()
print("ready", flush=True)
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(20):
        torch.matmul(a, b, out=c)
    torch.cuda.synchronize()
    n += 20
    print(f"progress {n}", flush=True)
"""

DECODE: Final = r"""
import sys, time, torch
seconds = float(sys.argv[1])
hidden, layers = 8192, 64  # 64 x 128 MiB of bf16 weights: 8 GiB read per token, >> 60 MB of L2
ws = [torch.randn(hidden, hidden, device="cuda", dtype=torch.bfloat16).mul_(hidden ** -0.5)
      for _ in range(layers)]
x = torch.randn(1, hidden, device="cuda", dtype=torch.bfloat16)

def token(x):
    for w in ws:
        x = x @ w  # batch-1 matrix-vector product: every weight byte read once per token
    return x / x.norm()

x = token(x)
torch.cuda.synchronize()
print("ready", flush=True)
n, end = 0, time.monotonic() + seconds
while time.monotonic() < end:
    for _ in range(10):
        x = token(x)
    torch.cuda.synchronize()
    n += 10
    print(f"progress {n}", flush=True)
"""

SPIN: Final = r"""
import sys, numpy as np, cupy as cp
seconds, blocks = float(sys.argv[1]), int(sys.argv[2])
src = r'''
extern "C" __global__ void spin(const volatile int* flag, unsigned long long budget_ns, int* seen) {
    // Like a rank inside a collective whose peer never arrives: poll a flag in device memory
    // that nothing will ever set. The budget (read from %globaltimer) is this capture's safety.
    unsigned long long start, now;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(start));
    do {
        if (*flag != 0) break;
        asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(now));
    } while (now - start < budget_ns);
    if (threadIdx.x == 0) seen[blockIdx.x] = *flag;
}
'''
kernel = cp.RawKernel(src, "spin")
flag = cp.zeros(1, dtype=cp.int32)
seen = cp.full(blocks, -1, dtype=cp.int32)
kernel((blocks,), (256,), (flag, np.uint64(1000), seen))  # compile and load first
cp.cuda.Device().synchronize()
print("ready", flush=True)
print("progress 1", flush=True)
kernel((blocks,), (256,), (flag, np.uint64(int(seconds * 1e9)), seen))
cp.cuda.Device().synchronize()  # the engine's host thread waits here; no progress
print("progress 2", flush=True)
assert int(seen.sum()) == 0, "every block ended on its budget, the flag never changed"
"""

# case: (workload source or None, extra argv, description)
CASES: Final[dict[str, tuple[str | None, list[str], str]]] = {
    "idle-cold": (None, [], "nothing running on the GPU (first case: cold)"),
    "decode": (DECODE, [], "memory-bound decode-like loop: batch-1 bf16 matrix-vector products "
               "over 64 layers of 8192x8192 weights (8 GiB read per token); progress = tokens"),
    "matmul": (MATMUL, [], "compute-bound: 8192x8192x8192 bf16 matrix products; "
               "progress = products done"),
    "spin": (SPIN, ["528"], "imitation of a deadlocked collective: 528 blocks x 256 threads "
             "(every SM) poll a device-memory flag that never changes; progress stops at 1"),
    "spin-few": (SPIN, ["8"], "the same spin on 8 blocks x 256 threads (a collective's "
                 "channel count, not every SM); progress stops at 1"),
    "idle-warm": (None, [], "nothing running on the GPU, right after the other cases"),
}


class _KeepOpen:
    """pynvml with init/shutdown made no-ops, so `capture()` can run every half second."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml

    def nvmlInit(self) -> None:
        pass

    def nvmlShutdown(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self._nvml, name)


def _extra(handle: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    asks: dict[str, Callable[[], Any]] = {
        "clock_sm_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_SM),
        "clock_mem_mhz": lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_MEM),
        "clock_graphics_mhz":
            lambda: pynvml.nvmlDeviceGetClockInfo(handle, pynvml.NVML_CLOCK_GRAPHICS),
        "pstate": lambda: pynvml.nvmlDeviceGetPerformanceState(handle),
        "energy_mj": lambda: pynvml.nvmlDeviceGetTotalEnergyConsumption(handle),
    }
    for key, ask in asks.items():
        try:
            out[key] = ask()
        except pynvml.NVMLError as exc:
            out[key] = {"error": type(exc).__name__, "message": str(exc)}
    return out


class _Progress:
    """The last `progress N` a workload printed (None until the first)."""

    def __init__(self, stream: IO[str]) -> None:
        self.value: int | None = None
        self.ready = threading.Event()
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            word, _, rest = line.strip().partition(" ")
            if word == "ready":
                self.ready.set()
            elif word == "progress":
                self.value = int(rest)
        self.ready.set()


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def run_case(case: str, seconds: float, interval: float) -> dict[str, Any]:
    code, argv, description = CASES[case]
    load: subprocess.Popen[str] | None = None
    progress: _Progress | None = None
    if code is not None:
        budget = seconds + 3
        load = subprocess.Popen([sys.executable, "-c", code, str(budget), *argv],
                                stdout=subprocess.PIPE, text=True)
        assert load.stdout is not None
        progress = _Progress(load.stdout)
        if not progress.ready.wait(120) or load.poll() is not None:
            load.kill()
            raise SystemExit(f"{case}: the workload did not start")
        time.sleep(1.0)  # let NVML's utilization window fill with the workload
    pynvml.nvmlInit()
    try:
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        nvml = _KeepOpen(pynvml)
        samples: list[dict[str, Any]] = []
        t0 = time.monotonic()
        tick = t0
        while tick - t0 < seconds:
            now = time.monotonic()
            if now < tick:
                time.sleep(tick - now)
            t = time.monotonic() - t0
            samples.append({
                "t": round(t, 3),
                "progress": None if progress is None else progress.value,
                "captured": capture(nvml),
                "extra": _extra(handle),
            })
            tick += interval
        meta = {
            "name": pynvml.nvmlDeviceGetName(handle),
            "uuid": pynvml.nvmlDeviceGetUUID(handle),
            "driver": pynvml.nvmlSystemGetDriverVersion(),
            "cuda_driver_version": pynvml.nvmlSystemGetCudaDriverVersion(),
            "nvml_version": pynvml.nvmlSystemGetNVMLVersion(),
            "power_limit_w": pynvml.nvmlDeviceGetPowerManagementLimit(handle) / 1000,
        }
    finally:
        pynvml.nvmlShutdown()
    load_pid = None
    if load is not None:
        load_pid = load.pid
        try:
            load.wait(timeout=15)
        except subprocess.TimeoutExpired:
            load.terminate()
            load.wait()
    util = [s["captured"]["devices"][0]["nvmlDeviceGetUtilizationRates"]["value"]
            for s in samples]
    power = [s["captured"]["devices"][0]["nvmlDeviceGetPowerUsage"]["value"] / 1000
             for s in samples]
    clocks = [s["extra"]["clock_sm_mhz"] for s in samples
              if isinstance(s["extra"]["clock_sm_mhz"], int)]
    done = [s["progress"] for s in samples if s["progress"] is not None]
    summary = {
        "samples": len(samples),
        "median_utilization_gpu_pct": _median([u["gpu"] for u in util]),
        "median_utilization_memory_pct": _median([u["memory"] for u in util]),
        "median_power_w": _median(power),
        "min_power_w": min(power),
        "max_power_w": max(power),
        "median_clock_sm_mhz": _median([float(c) for c in clocks]),
        "progress_delta": (done[-1] - done[0]) if done else None,
        "workload_exit": None if load is None else load.returncode,
    }
    versions = {"python": platform.python_version(), "pynvml": _version("nvidia-ml-py")}
    if code is not None:
        versions["torch" if "torch" in code else "cupy"] = _version(
            "torch" if "torch" in code else "cupy-cuda13x")
    return {
        "source": f"captured by scripts/capture_nvml_cases.py on "
                  f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
        "case": case,
        "description": description,
        "gpu": meta,
        "host": {"kernel": platform.release(), "machine": platform.machine(), **versions},
        "interval_s": interval,
        "seconds": seconds,
        "workload": None if code is None else {
            "code": code, "argv": ["<budget seconds>", *argv], "budget_s": seconds + 3},
        "load_pid": load_pid,
        "summary": summary,
        "samples": samples,
    }


def _version(dist: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--prefix", default="h200")
    parser.add_argument("cases", nargs="*", default=list(CASES))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for case in args.cases:
        doc = run_case(case, args.seconds, args.interval)
        path = args.out / f"{args.prefix}-{case}.json"
        path.write_text(json.dumps(doc, indent=1) + "\n")
        print(case, json.dumps(doc["summary"]), flush=True)
        time.sleep(2)
    print("pid", os.getpid())
    return 0


if __name__ == "__main__":
    sys.exit(main())
