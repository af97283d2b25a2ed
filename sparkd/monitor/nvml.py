"""Adapter over NVML (module `pynvml` from the nvidia-ml-py distribution).

On GB10 (DGX Spark) `nvmlDeviceGetMemoryInfo` answers NVML_ERROR_NOT_SUPPORTED: memory is
unified, and the truth is /proc/meminfo (sparkd.monitor.memory). Per-process used memory,
utilization and the rest still report. So every query here may come back unsupported, and a
reading says which did (`unsupported`) instead of failing.

`capture(nvml)` records the raw answers of each call (or the error's name); `FixtureNvml`
replays such a capture with pynvml's own call surface, so tests run the real reading code
against answers captured on a real GPU (tests/fixtures/nvml/).
"""

from __future__ import annotations

import contextlib
import functools
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

MIB: Final = 1 << 20


@dataclass(frozen=True, slots=True)
class GpuProcess:
    pid: int
    used_bytes: int | None  # None: NVML does not know (it says so on some drivers)


@dataclass(frozen=True, slots=True)
class GpuReading:
    index: int
    name: str
    uuid: str
    memory_total: int | None  # None: not supported (unified memory: see /proc/meminfo)
    memory_used: int | None
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None
    processes: tuple[GpuProcess, ...]
    unsupported: tuple[str, ...]  # the queries that answered NOT_SUPPORTED
    # NVML utilization.memory: the share of time device memory was read or written (liveness:
    # ~0 beside ~100 % utilization is a spinning kernel). None: not reported. Last and
    # defaulted, so readings built without it still construct.
    memory_utilization_pct: int | None = None
    # Pids of the graphics (not compute) processes on the GPU: a display server among them
    # means a desktop (sparkd.monitor.desktop). Empty where NVML does not say.
    graphics_pids: tuple[int, ...] = ()

    @property
    def process_bytes(self) -> int:
        return sum(p.used_bytes or 0 for p in self.processes)

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "name": self.name,
            "uuid": self.uuid,
            "memory_total_bytes": self.memory_total,
            "memory_used_bytes": self.memory_used,
            "utilization_pct": self.utilization_pct,
            "memory_utilization_pct": self.memory_utilization_pct,
            "temperature_c": self.temperature_c,
            "power_w": self.power_w,
            "processes": [{"pid": p.pid, "used_bytes": p.used_bytes} for p in self.processes],
            "process_bytes": self.process_bytes,
            "unsupported": list(self.unsupported),
        }


@dataclass(frozen=True, slots=True)
class NvmlSnapshot:
    driver: str | None
    gpus: tuple[GpuReading, ...]
    error: str | None = None  # NVML itself is unusable (no driver, no GPU): why

    @property
    def unified_memory(self) -> bool:
        """Memory info is unsupported on every GPU: the GB10 case (use /proc/meminfo)."""
        return bool(self.gpus) and all(g.memory_total is None for g in self.gpus)

    def to_json(self) -> dict[str, Any]:
        return {
            "driver": self.driver,
            "error": self.error,
            "unified_memory": self.unified_memory,
            "gpus": [g.to_json() for g in self.gpus],
        }


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read(nvml: Any) -> NvmlSnapshot:
    """One reading of every GPU, NVML opened and closed around it. `nvml` is the pynvml
    module (or a FixtureNvml)."""
    monitor = NvmlMonitor(nvml)
    try:
        return monitor.read()
    finally:
        monitor.close()


def _read_gpu(nvml: Any, index: int) -> GpuReading:
    handle = nvml.nvmlDeviceGetHandleByIndex(index)
    unsupported: list[str] = []

    def ask(what: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except nvml.NVMLError_NotSupported:
            unsupported.append(what)
            return None

    mem = ask("memory", lambda: nvml.nvmlDeviceGetMemoryInfo(handle))
    util = ask("utilization", lambda: nvml.nvmlDeviceGetUtilizationRates(handle))
    temp = ask("temperature", lambda: nvml.nvmlDeviceGetTemperature(handle, 0))
    power = ask("power", lambda: nvml.nvmlDeviceGetPowerUsage(handle))
    procs = ask("processes", lambda: nvml.nvmlDeviceGetComputeRunningProcesses(handle)) or []
    return GpuReading(
        index=index,
        name=_text(nvml.nvmlDeviceGetName(handle)),
        uuid=_text(nvml.nvmlDeviceGetUUID(handle)),
        memory_total=None if mem is None else int(mem.total),
        memory_used=None if mem is None else int(mem.used),
        utilization_pct=None if util is None else int(util.gpu),
        temperature_c=None if temp is None else int(temp),
        power_w=None if power is None else power / 1000.0,
        processes=tuple(
            GpuProcess(int(p.pid), None if p.usedGpuMemory is None else int(p.usedGpuMemory))
            for p in procs
        ),
        unsupported=tuple(unsupported),
        memory_utilization_pct=None if util is None else int(util.memory),
        graphics_pids=_graphics_pids(nvml, handle),
    )


@dataclass(frozen=True, slots=True)
class ComputeCapability:
    """GPU 0's CUDA compute capability as (major, minor): 9.0 on an H200, 12.1 on a GB10;
    None with the reason when it could not be read (no driver, no GPU, no pynvml)."""

    value: tuple[int, int] | None
    error: str | None = None

    def __str__(self) -> str:
        return "unknown" if self.value is None else f"{self.value[0]}.{self.value[1]}"


def read_compute_capability(nvml: Any | None = None) -> ComputeCapability:
    """GPU 0's compute capability (`nvmlDeviceGetCudaComputeCapability`), NVML opened and
    closed around it. GPU 0 because that is the device vLLM asks (vllm 0.17.0
    platforms/interface.py `is_device_capability_family(capability, device_id=0)`)."""
    if nvml is None:
        try:
            import pynvml
        except ImportError as exc:
            return ComputeCapability(None, f"pynvml is not installed: {exc}")
        nvml = pynvml
    assert nvml is not None
    try:
        nvml.nvmlInit()
    except nvml.NVMLError as exc:
        return ComputeCapability(None, f"NVML is not available: {exc}")
    try:
        if nvml.nvmlDeviceGetCount() < 1:
            return ComputeCapability(None, "NVML sees no GPU")
        major, minor = nvml.nvmlDeviceGetCudaComputeCapability(
            nvml.nvmlDeviceGetHandleByIndex(0))
        return ComputeCapability((int(major), int(minor)))
    except nvml.NVMLError as exc:
        return ComputeCapability(None, f"NVML failed: {exc}")
    finally:
        nvml.nvmlShutdown()


@functools.cache
def compute_capability() -> ComputeCapability:
    """This machine's GPU compute capability, read once per process (it does not change
    while the machine runs): the daemon renders every unit with it."""
    return read_compute_capability()


def _graphics_pids(nvml: Any, handle: Any) -> tuple[int, ...]:
    """nvmlDeviceGetGraphicsRunningProcesses (pynvml); () when NVML or a replayed fixture
    does not answer it."""
    try:
        return tuple(int(p.pid) for p in nvml.nvmlDeviceGetGraphicsRunningProcesses(handle))
    except (nvml.NVMLError, AttributeError, KeyError):
        return ()


# -- capture and replay ---------------------------------------------------------------------

_CALLS: Final = (
    "nvmlDeviceGetName",
    "nvmlDeviceGetUUID",
    "nvmlDeviceGetMemoryInfo",
    "nvmlDeviceGetUtilizationRates",
    "nvmlDeviceGetTemperature",
    "nvmlDeviceGetPowerUsage",
    "nvmlDeviceGetComputeRunningProcesses",
    "nvmlDeviceGetCudaComputeCapability",
)


def _plain(value: Any) -> Any:
    """A pynvml answer as JSON: structs become dicts of their fields."""
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    fields = getattr(value, "_fields_", None)
    if fields is not None:
        return {name: _plain(getattr(value, name)) for name, *_ in fields}
    if hasattr(value, "__dict__"):  # pynvml's nvmlFriendlyObject (process lists)
        return {k: _plain(v) for k, v in vars(value).items() if not k.startswith("_")}
    return _text(value) if isinstance(value, bytes) else value


def capture(nvml: Any) -> dict[str, Any]:
    """The raw answer (or error class name) of every call `read` makes, for a fixture."""
    nvml.nvmlInit()
    try:
        devices = []
        for i in range(nvml.nvmlDeviceGetCount()):
            handle = nvml.nvmlDeviceGetHandleByIndex(i)
            answers: dict[str, Any] = {}
            for call in _CALLS:
                fn = getattr(nvml, call)
                args = (handle, 0) if call == "nvmlDeviceGetTemperature" else (handle,)
                try:
                    answers[call] = {"value": _plain(fn(*args))}
                except nvml.NVMLError as exc:
                    answers[call] = {"error": type(exc).__name__, "message": str(exc)}
            devices.append(answers)
        return {"driver": _text(nvml.nvmlSystemGetDriverVersion()), "devices": devices}
    finally:
        nvml.nvmlShutdown()


class _Struct:
    def __init__(self, fields: dict[str, Any]) -> None:
        self.__dict__.update(fields)


class FixtureNvml:
    """pynvml's call surface, answering from a `capture()` (tests and offline tools)."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def __init__(self, captured: dict[str, Any]) -> None:
        self._captured = captured
        self._errors = {"NVMLError_NotSupported": self.NVMLError_NotSupported}

    def nvmlInit(self) -> None:
        if "init_error" in self._captured:
            raise self.NVMLError(self._captured["init_error"])

    def nvmlShutdown(self) -> None:
        pass

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self._captured["driver"])

    def nvmlDeviceGetCount(self) -> int:
        return len(self._captured["devices"])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> int:
        return index

    def __getattr__(self, call: str) -> Callable[..., Any]:
        if call not in _CALLS:
            raise AttributeError(call)

        def answer(handle: int, *_args: Any) -> Any:
            recorded = self._captured["devices"][handle][call]
            if "error" in recorded:
                raise self._errors.get(recorded["error"], self.NVMLError)(recorded["message"])
            return _revive(recorded["value"])

        return answer


def _revive(value: Any) -> Any:
    if isinstance(value, list):
        return [_revive(v) for v in value]
    if isinstance(value, dict):
        return _Struct({k: _revive(v) for k, v in value.items()})
    return value


class NvmlMonitor:
    """NVML kept initialized between readings (nvmlInit is not free). Blocking: call from a
    worker thread. Without a driver or GPU (CI, a VM) every reading carries the reason."""

    #: Seconds before the first attempt to open NVML again after it failed (the driver not up
    #: yet at boot, a GPU lost and bound again): boot's wait_for_gpu polls every 0.5 s for
    #: 60 s. Each failure in a row doubles it up to RETRY_MAX_S: an NVML that keeps failing
    #: (a call refused in a container) is not opened and closed every 2 s.
    RETRY_S: Final = 2.0
    RETRY_MAX_S: Final = 10.0

    def __init__(self, nvml: Any | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._nvml = nvml
        self._ready = False
        self._error: str | None = None
        self._clock = clock
        self._failed_at: float | None = None  # when NVML last failed to open or to answer
        self._retry_s = self.RETRY_S

    def _open(self) -> Any:
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as exc:  # nvidia-ml-py is a dependency; be clear anyway
                self._error = f"pynvml is not installed: {exc}"
                return None
            self._nvml = pynvml
        if not self._ready and (self._failed_at is None
                                or self._clock() - self._failed_at >= self._retry_s):
            try:
                self._nvml.nvmlInit()
                self._ready, self._error = True, None
            except self._nvml.NVMLError as exc:
                self._error = f"NVML is not available: {exc}"
                self._failed()
        return self._nvml if self._ready else None

    def _failed(self) -> None:
        if self._failed_at is not None:
            self._retry_s = min(self._retry_s * 2, self.RETRY_MAX_S)
        self._failed_at = self._clock()

    def read(self) -> NvmlSnapshot:
        nvml = self._open()
        if nvml is None:
            return NvmlSnapshot(driver=None, gpus=(), error=self._error)
        try:
            driver = _text(nvml.nvmlSystemGetDriverVersion())
            gpus = tuple(_read_gpu(nvml, i) for i in range(nvml.nvmlDeviceGetCount()))
            self._failed_at, self._retry_s = None, self.RETRY_S
            return NvmlSnapshot(driver=driver, gpus=gpus)
        except nvml.NVMLError as exc:
            # Closed, and opened again at a later reading: after a GPU is lost and bound
            # again the old session does not recover.
            self._error = f"NVML failed: {exc}"
            self.close()
            self._failed()
            return NvmlSnapshot(driver=None, gpus=(), error=self._error)

    def close(self) -> None:
        if self._ready and self._nvml is not None:
            self._ready = False
            with contextlib.suppress(self._nvml.NVMLError):
                self._nvml.nvmlShutdown()
