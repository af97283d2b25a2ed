"""A recording stand-in for the `os` module and the crash states a power loss can leave: the
idea of ALICE (Pillai et al., "All File Systems Are Not Created Equal: On the Complexity of
Crafting Crash-Consistent Applications", OSDI 2014) and CrashMonkey (Mohan et al., "Finding
Crash-Consistency Bugs with Bounded Black-Box Crash Testing", OSDI 2018), small enough for
sparkd's one write sequence.

`RecordingOs` is put in place of a module's `os` (`monkeypatch.setattr(sparkd.atomic, "os",
fs)`): the write function then runs against an in-memory directory, nothing reaches the disk,
and `fs.ops` is the sequence of file operations it performed (create, truncate, write, fsync,
rename, directory fsync; `fs.returned()` marks where the function returned).

`crash_states(initial, ops)` yields every directory a power loss after each prefix of `ops`
can leave, under this model (the weakest that the sequence can be judged against; stated so
that a reader can check it):

- `fsync(fd)` of a file makes its data and size durable (fsync(2): "transfers ("flushes") all
  modified in-core data of ... the file referred to by the file descriptor fd to the disk").
- It does not make the file's directory entry durable: "Calling fsync() does not necessarily
  ensure that the entry in the directory containing the file has also reached disk. For that
  an explicit fsync() on a file descriptor for the directory is also needed" (fsync(2), Linux
  man-pages). A directory fsync makes that directory's earlier creates and renames durable.
- Directory operations not yet covered by a directory fsync are lost from some point on: a
  prefix of them persists, in order. That is what ext4's journal gives (metadata operations
  are committed in transactions, in order; ALICE, section 4, finds ext4 in its default mode
  persists directory operations in order). A rename is atomic: the name is the old file or
  the new one.
- Data writes not yet covered by an fsync of their file are each lost, kept, or torn (a
  prefix of the write kept, with the file's size at the end of the write, the rest zeros, or
  at the end of the kept prefix), independently of each other and **with no ordering against
  the directory operations**: a rename can persist while the renamed file's unsynced data
  does not. That is ext4 `data=writeback` ("Data ordering is not preserved, data may be
  written into the main file system after its metadata has been committed to the journal",
  Documentation/admin-guide/ext4.rst, Linux 6.x) and also `data=ordered` with delayed
  allocation where `auto_da_alloc` does not apply (`noauto_da_alloc`, or a pattern it does
  not detect: "If auto_da_alloc is enabled, ext4 will detect the replace-via-rename and
  replace-via-truncate patterns and force that any delayed allocation blocks are allocated
  such that at the next journal commit, in the default data=ordered mode, the data blocks of
  the new file are forced to disk before the rename() operation is committed", same file).
  sparkd must not rely on data=ordered's stronger guarantee: the DGX Spark's root file system
  is ext4 with its defaults today, but the state directory may be on another file system.

Every prefix of the sequence is a crash point; crash points after `returned()` are where the
caller was told the write is durable.
"""

from __future__ import annotations

import itertools
import os as real_os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any


@dataclass(frozen=True, slots=True)
class Op:
    """One file operation. kind: create (name, ino), truncate (ino), write (ino, offset,
    data), fsync (ino), rename (name -> dst), fsync_dir, returned."""

    kind: str
    name: str = ""
    dst: str = ""
    ino: int = 0
    offset: int = 0
    data: bytes = b""


class FakeFile:
    def __init__(self, fs: RecordingOs, fd: int) -> None:
        self.fs = fs
        self.fd = fd
        self.pos = 0

    def write(self, data: bytes) -> int:
        ino = self.fs.fd_ino(self.fd)
        self.fs.ops.append(Op("write", ino=ino, offset=self.pos, data=bytes(data)))
        self.pos += len(data)
        return len(data)

    def flush(self) -> None:
        pass

    def fileno(self) -> int:
        return self.fd

    def close(self) -> None:
        self.fs.close(self.fd)

    def __enter__(self) -> FakeFile:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class RecordingOs:
    """The part of `os` that a write function calls, on one in-memory directory. Names are
    full paths (str); constants (O_CREAT, ...) are the real module's."""

    def __init__(self, directory: str, initial: Mapping[str, bytes]) -> None:
        self.directory = directory
        self.names = {name: ino for ino, name in enumerate(initial, start=1)}
        self.ops: list[Op] = []
        self._next_ino = len(initial) + 1
        self._fds: dict[int, int | str] = {}  # fd -> ino, or the directory's path

    def __getattr__(self, name: str) -> Any:
        if name.startswith("O_"):
            return getattr(real_os, name)
        raise AttributeError(f"RecordingOs has no {name}: record it before a write uses it")

    def fd_ino(self, fd: int) -> int:
        ino = self._fds[fd]
        assert isinstance(ino, int), f"fd {fd} is a directory"
        return ino

    def _name(self, path: Any) -> str:
        name = str(path)
        assert real_os.path.dirname(name) == self.directory, (
            f"{name}: the model has one directory, {self.directory}")
        return name

    def open(self, path: Any, flags: int, mode: int = 0o777) -> int:
        fd = 100 + len(self.ops) + len(self._fds)
        while fd in self._fds:
            fd += 1
        if flags & real_os.O_DIRECTORY:
            assert str(path) == self.directory
            self._fds[fd] = self.directory
            return fd
        name = self._name(path)
        if name in self.names:
            ino = self.names[name]
            if flags & real_os.O_TRUNC:
                self.ops.append(Op("truncate", ino=ino))
        elif flags & real_os.O_CREAT:
            ino = self._next_ino
            self._next_ino += 1
            self.names[name] = ino
            self.ops.append(Op("create", name=name, ino=ino))
        else:
            raise FileNotFoundError(name)
        self._fds[fd] = ino
        return fd

    def fdopen(self, fd: int, mode: str = "r") -> FakeFile:
        assert mode == "wb", mode
        return FakeFile(self, fd)

    def fchmod(self, fd: int, mode: int) -> None:
        self.fd_ino(fd)

    def fsync(self, fd: int) -> None:
        target = self._fds[fd]
        self.ops.append(Op("fsync", ino=target) if isinstance(target, int) else Op("fsync_dir"))

    def replace(self, src: Any, dst: Any) -> None:
        source, target = self._name(src), self._name(dst)
        self.names[target] = self.names.pop(source)
        self.ops.append(Op("rename", name=source, dst=target))

    rename = replace

    def close(self, fd: int) -> None:
        del self._fds[fd]

    def getpid(self) -> int:
        return 4242

    def returned(self) -> None:
        self.ops.append(Op("returned"))


def _data_choices(op: Op) -> list[tuple[int, bytes] | None]:
    """What of one unsynced write a power loss leaves: (offset, bytes written there, zeros
    included) or None for nothing, the size unchanged."""
    if op.kind == "truncate":
        return [None, (0, b"")]
    n = len(op.data)
    cuts = sorted({0, 1, n // 2, n - 1} & set(range(n)))
    choices: list[tuple[int, bytes] | None] = [None, (op.offset, op.data)]
    for cut in cuts:
        choices.append((op.offset, op.data[:cut]))  # the size at the end of what was kept
        choices.append((op.offset, op.data[:cut] + bytes(n - cut)))  # the size at the end
    return choices


def _apply(content: bytes, kind: str, piece: tuple[int, bytes]) -> bytes:
    if kind == "truncate":
        return b""
    offset, data = piece
    grown = content.ljust(offset, b"\0")
    return grown[:offset] + data + grown[offset + len(data):]


@dataclass(frozen=True, slots=True)
class CrashState:
    prefix: int  # how many ops ran before the power loss
    after_return: bool  # the write function had returned: it said the write was durable
    files: dict[str, bytes]  # name -> content, as the next boot finds the directory
    how: str  # which unsynced operations were kept, for a failure's message


def crash_states(initial: Mapping[str, bytes], ops: list[Op]) -> Iterator[CrashState]:
    """Every directory a power loss after each prefix of `ops` can leave (the model above)."""
    inos = {name: ino for ino, name in enumerate(initial, start=1)}
    durable_content = {inos[name]: bytes(data) for name, data in initial.items()}
    for prefix in range(len(ops) + 1):
        done = ops[:prefix]
        after_return = any(op.kind == "returned" for op in done)
        dir_ops = [(i, op) for i, op in enumerate(done) if op.kind in ("create", "rename")]
        last_dir_sync = max((i for i, op in enumerate(done) if op.kind == "fsync_dir"),
                            default=-1)
        synced_dir = [op for i, op in dir_ops if i < last_dir_sync]
        unsynced_dir = [op for i, op in dir_ops if i > last_dir_sync]
        # Per inode: data ops up to its last fsync are durable; the later ones are choices.
        data_ops = [(i, op) for i, op in enumerate(done) if op.kind in ("write", "truncate")]
        last_sync = {op.ino: i for i, op in enumerate(done) if op.kind == "fsync"}
        durable = [op for i, op in data_ops if i < last_sync.get(op.ino, -1)]
        volatile = [op for i, op in data_ops if i > last_sync.get(op.ino, -1)]
        base = dict(durable_content)
        for op in durable:
            base[op.ino] = _apply(base.get(op.ino, b""), op.kind, (op.offset, op.data))
        for kept_dir in range(len(unsynced_dir) + 1):
            names = dict(inos)
            for op in [*synced_dir, *unsynced_dir[:kept_dir]]:
                if op.kind == "create":
                    names[op.name] = op.ino
                else:
                    names[op.dst] = names.pop(op.name)
            for picks in itertools.product(*(_data_choices(op) for op in volatile)):
                content = dict(base)
                kept = []
                for op, piece in zip(volatile, picks, strict=True):
                    if piece is not None:
                        content[op.ino] = _apply(content.get(op.ino, b""), op.kind, piece)
                        kept.append(f"{op.kind} ino {op.ino}: {len(piece[1])} bytes")
                files = {name: content.get(ino, b"") for name, ino in names.items()}
                yield CrashState(prefix, after_return, files,
                                 f"after op {prefix} ({done[-1].kind if done else 'none'}), "
                                 f"{kept_dir} of {len(unsynced_dir)} unsynced directory ops "
                                 f"kept, unsynced data kept: {kept or 'none'}")
