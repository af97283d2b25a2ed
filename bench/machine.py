"""One line naming the machine a benchmark ran on (for bench/RESULTS.md)."""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path


def describe() -> str:
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = int(Path("/proc/meminfo").read_text().split()[1]) // (1 << 20)
    system = "unknown OS"
    with contextlib.suppress(OSError):
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                system = line.split("=", 1)[1].strip('"')
    return (f"{cpu}, {len(os.sched_getaffinity(0))} cores, {mem} GiB, {system}, "
            f"Python {platform.python_version()}")
