"""What the simulated engine (a test double) really does while it "loads a model".

It writes synthetic weights when the model directory is empty, reads every file fully so the
kernel page cache fills as it would for real weights, and allocates resident memory page by
page so the process's RSS grows. All of it is blocking work for a thread; `cancelled` is polled
between chunks so SIGTERM is answered within one chunk's time.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Final

MIB: Final = 1024 * 1024
CHUNK: Final = 4 * MIB
RESIDENT_BLOCK: Final = 64 * MIB
WEIGHTS_NAME: Final = "model-00001-of-00001.safetensors"
PARTIAL_NAME: Final = f".{WEIGHTS_NAME}.partial"


class LoadCancelled(Exception):
    """The engine was told to stop while it was loading."""


@dataclass(frozen=True, slots=True)
class FilesRead:
    files: int
    bytes: int


# --- pure: the synthetic weights' bytes ------------------------------------------------------


def safetensors_header(total_bytes: int) -> bytes:
    """The 8-byte length and JSON header of a valid safetensors file of exactly `total_bytes`.

    The one tensor is a flat U8 array filling the rest of the file; the header is padded with
    spaces to a multiple of 8 bytes (the format allows trailing spaces), so the data is aligned.
    """
    size = 8  # the header's length: grows until the header for the remaining data fits in it
    while (data := total_bytes - 8 - size) >= 0:
        meta = {
            "__metadata__": {"format": "pt", "generator": "sparkd sim-engine (test double)"},
            "weight": {"dtype": "U8", "shape": [data], "data_offsets": [0, data]},
        }
        text = json.dumps(meta, separators=(",", ":")).encode()
        if len(text) <= size:
            return size.to_bytes(8, "little") + text.ljust(size)
        size += 8 * ((len(text) - size + 7) // 8)
    raise ValueError(f"{total_bytes} bytes cannot hold a safetensors header")


def synthetic_chunk(index: int, size: int) -> bytes:
    """Deterministic, incompressible bytes for chunk `index` of the synthetic tensor."""
    return hashlib.shake_256(b"sparkd-sim-weights:%d" % index).digest(size)


# --- I/O -------------------------------------------------------------------------------------


def model_files(directory: Path) -> list[Path]:
    """Every regular file under `directory` (symlinks to files included, as in a Hub snapshot)."""
    found: list[Path] = []
    for root, _dirs, names in os.walk(directory):
        for name in names:
            path = Path(root, name)
            if name != PARTIAL_NAME and path.is_file():
                found.append(path)
    return sorted(found)


def write_synthetic_weights(directory: Path, mib: int, *, cancelled: Callable[[], bool]) -> Path:
    """Create `directory` and write a `mib` MiB safetensors file there, durably.

    The file appears under its final name only when complete (temp name, fsync, rename, fsync
    of the directory), so an engine killed mid-write leaves no half a model behind.
    """
    directory.mkdir(parents=True, exist_ok=True)
    final, partial = directory / WEIGHTS_NAME, directory / PARTIAL_NAME
    total = mib * MIB
    header = safetensors_header(total)
    try:
        with partial.open("wb") as out:
            out.write(header)
            remaining, index = total - len(header), 0
            while remaining > 0:
                if cancelled():
                    raise LoadCancelled
                chunk = synthetic_chunk(index, min(CHUNK, remaining))
                out.write(chunk)
                remaining -= len(chunk)
                index += 1
            out.flush()
            os.fsync(out.fileno())
        partial.replace(final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return final


def read_files(paths: list[Path], *, cancelled: Callable[[], bool]) -> FilesRead:
    """Read every file to its end, as an engine loading weights does (filling the page cache)."""
    buffer = bytearray(CHUNK)
    view = memoryview(buffer)
    total = 0
    for path in paths:
        with path.open("rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
                if cancelled():
                    raise LoadCancelled
    return FilesRead(files=len(paths), bytes=total)


def allocate_resident(mib: int, *, cancelled: Callable[[], bool]) -> list[bytearray]:
    """`mib` MiB of memory that is really resident, in blocks so that a stop is not delayed.

    bytearray() zero-fills, which already faults every page in; writing one byte per page
    keeps that true whatever the allocator does (calloc may map untouched zero pages).
    """
    blocks: list[bytearray] = []
    remaining = mib * MIB
    while remaining > 0:
        if cancelled():
            raise LoadCancelled
        block = bytearray(min(RESIDENT_BLOCK, remaining))
        block[:: mmap.PAGESIZE] = b"\x01" * len(range(0, len(block), mmap.PAGESIZE))
        blocks.append(block)
        remaining -= len(block)
    return blocks
