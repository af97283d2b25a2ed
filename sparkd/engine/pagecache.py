"""How much of a file is in the page cache, and evicting it: the adapter behind warm swaps.

`cached_bytes(path)` asks the kernel with cachestat(2) (Linux 6.5+, syscall 451 on x86_64
and on arm64, whose table is asm-generic's: `include/uapi/asm-generic/unistd.h`,
`arch/x86/entry/syscalls/syscall_64.tbl`; the call itself is in `mm/filemap.c`). Python has
no wrapper, so it goes through `ctypes` and libc's `syscall()`. The struct layouts are the uapi
ones (`include/uapi/linux/mman.h`): `cachestat_range {u64 off; u64 len}` (len 0: to the end of
the file) and `cachestat {u64 nr_cache, nr_dirty, nr_writeback, nr_evicted,
nr_recently_evicted}`, counted in pages.

Where the kernel is older (ENOSYS), or a seccomp filter refuses it (EPERM), it falls back to
mincore(2) over a read-only shared mapping of the file, one byte per page, as util-linux
`fincore` does. Both answer in milliseconds for a multi-GB file (bench/warm_swap.py measures
them; numbers in bench/RESULTS.md). Neither reads the file nor changes what is cached.

`evict(path)` is `posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED)`: the kernel drops the file's
clean, unmapped pages; pages an engine still maps, and dirty ones, stay (prestart syncs first).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import stat
from pathlib import Path
from typing import Final, Literal

CACHESTAT_NR: Final = 451  # the same number on x86_64 and arm64 (aarch64)
PAGE: Final = mmap.PAGESIZE
PROT_READ: Final = 0x1
MAP_SHARED: Final = 0x01
MAP_FAILED: Final = ctypes.c_void_p(-1).value

Method = Literal["cachestat", "mincore"]
_LOW_BIT: Final = bytes(b & 1 for b in range(256))


class _Range(ctypes.Structure):
    _fields_ = (("off", ctypes.c_uint64), ("len", ctypes.c_uint64))


class _Stat(ctypes.Structure):
    _fields_ = (
        ("nr_cache", ctypes.c_uint64),
        ("nr_dirty", ctypes.c_uint64),
        ("nr_writeback", ctypes.c_uint64),
        ("nr_evicted", ctypes.c_uint64),
        ("nr_recently_evicted", ctypes.c_uint64),
    )


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
    libc.syscall.restype = ctypes.c_long
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                          ctypes.c_int, ctypes.c_long)
    libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
    libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)
    return libc


def open_regular(path: Path) -> int:
    """A read-only descriptor of `path`, which must be a regular file. O_NONBLOCK: a FIFO or a
    device put in a model file's place (between the walk and this open) is refused, never
    waited on (no effect on a regular file). Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | os.O_NOCTTY)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    return fd


class PageCache:
    """One process's view of the page cache. Remembers when cachestat(2) is not there, so a
    prestart over hundreds of files asks the kernel once."""

    def __init__(self, *, method: Method | None = None) -> None:
        self._libc = _libc()
        # None: try cachestat first, then remember what worked.
        self.method: Method | None = method

    def cached_bytes(self, path: Path) -> int:
        """Bytes of `path` in the page cache. Raises OSError (cannot open, mincore failed)."""
        fd = open_regular(path)
        try:
            if self.method != "mincore":
                pages = self._cachestat(fd)
                if pages is not None:
                    self.method = "cachestat"
                    return pages * PAGE
                self.method = "mincore"
            return self._mincore(fd) * PAGE
        finally:
            os.close(fd)

    def _cachestat(self, fd: int) -> int | None:
        """Cached pages of the whole file, None where the kernel has no cachestat(2)."""
        rng, out = _Range(0, 0), _Stat()
        rc = self._libc.syscall(ctypes.c_long(CACHESTAT_NR), ctypes.c_uint(fd),
                                ctypes.byref(rng), ctypes.byref(out), ctypes.c_uint(0))
        if rc == 0:
            return int(out.nr_cache)
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM) and self.method is None:
            return None
        raise OSError(err, f"cachestat: {os.strerror(err)}")

    def _mincore(self, fd: int) -> int:
        size = os.fstat(fd).st_size
        if size == 0:
            return 0
        addr = self._libc.mmap(None, size, PROT_READ, MAP_SHARED, fd, 0)
        if addr is None or addr == MAP_FAILED:
            err = ctypes.get_errno()
            raise OSError(err, f"mmap: {os.strerror(err)}")
        try:
            npages = (size + PAGE - 1) // PAGE
            vec = (ctypes.c_ubyte * npages)()
            if self._libc.mincore(addr, size, vec) != 0:
                err = ctypes.get_errno()
                raise OSError(err, f"mincore: {os.strerror(err)}")
            # Bit 0 is residency; the other bits are reserved.
            return bytes(vec).translate(_LOW_BIT).count(1)
        finally:
            self._libc.munmap(addr, size)


def evict(path: Path) -> None:
    """Drop `path`'s clean pages from the page cache. Raises OSError."""
    fd = open_regular(path)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
