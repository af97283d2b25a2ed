"""Parallel, incremental verification of a model directory against its manifest.

- `scan_model_dir(root)`: one stat per file (symlinks followed: a Hugging Face snapshot is
  symlinks into `blobs/`), sparkd's partial downloads (`.NAME.part`) told apart.
- `hash_file(path, algorithm)`: large `readinto` calls on one preallocated buffer, so the
  hashing runs at OpenSSL's speed (hashlib releases the GIL for buffers over 2 KiB, and the
  read and the hash never copy the data in Python). The stamp is taken from the open file
  before and after: a file that changed while it was read gets no stamp.
- `verify_dir(root, manifest, full=...)`: the pure plan decides what to read; the files to
  read are hashed in a thread pool (one file per thread, biggest first); the returned report
  carries the manifest with the new stamps (the caller saves it).
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

from sparkd.store.manifest import Algorithm, FileEntry, Manifest, Stamp
from sparkd.store.plan import (
    FileVerdict,
    LocalView,
    Status,
    VerifyReport,
    judge,
    merge_verdicts,
    plan_verify,
)
from sparkd.store.progress import NullReporter, Reporter

BUF_SIZE: Final = 8 << 20  # big enough that per-call overhead vanishes, small enough for L3
PART_PREFIX: Final = "."
PART_SUFFIX: Final = ".part"


class Hasher(Protocol):
    def update(self, data: bytes | memoryview, /) -> None: ...

    def hexdigest(self) -> str: ...


def new_hasher(algorithm: Algorithm, size: int) -> Hasher:
    """SHA-256, or git's blob SHA-1 (the SHA-1 of "blob SIZE\\0" followed by the content)."""
    if algorithm == "sha256":
        return hashlib.sha256()
    h = hashlib.sha1(usedforsecurity=False)
    h.update(b"blob %d\0" % size)
    return h


def partial_path(dest: Path) -> Path:
    """Where the download of `dest` accumulates: `.NAME.part` beside it."""
    return dest.with_name(f"{PART_PREFIX}{dest.name}{PART_SUFFIX}")


def _partial_target(name: str) -> str | None:
    if name.startswith(PART_PREFIX) and name.endswith(PART_SUFFIX) and len(name) > 6:
        return name[len(PART_PREFIX) : -len(PART_SUFFIX)]
    return None


@dataclass(frozen=True, slots=True)
class Scan:
    local: LocalView
    files: tuple[str, ...]  # every regular file (relative), for EXTRA


def scan_model_dir(root: Path) -> Scan:
    """Stat every regular file under root (following symlinks to files, not to directories).
    A missing root is an empty directory: every file will be MISSING."""
    stamps: dict[str, Stamp] = {}
    partials: dict[str, int] = {}
    stack = [("", root)]
    while stack:
        prefix, directory = stack.pop()
        try:
            entries = list(os.scandir(directory))
        except FileNotFoundError:
            continue
        for entry in entries:
            rel = f"{prefix}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                stack.append((f"{rel}/", Path(entry.path)))
                continue
            try:
                st = entry.stat(follow_symlinks=True)
            except OSError:
                continue  # a dangling symlink: the manifest's file is MISSING
            if not stat.S_ISREG(st.st_mode):
                continue
            target = _partial_target(entry.name)
            if target is not None:
                partials[f"{prefix}{target}"] = st.st_size
            elif ".tmp-" not in entry.name:  # sparkd.atomic's temp files
                stamps[rel] = Stamp.of(st)
    return Scan(LocalView(stamps=stamps, partials=partials), tuple(sorted(stamps)))


def hash_file(
    path: Path,
    algorithm: Algorithm,
    *,
    on_bytes: Callable[[int], None] | None = None,
    buf_size: int = BUF_SIZE,
) -> tuple[str, int, Stamp | None]:
    """(hex digest, bytes read, the stamp when the file did not change while read)."""
    buf = memoryview(bytearray(buf_size))
    with open(path, "rb", buffering=0) as f:
        before = os.fstat(f.fileno())
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_SEQUENTIAL)
        hasher = new_hasher(algorithm, before.st_size)
        total = 0
        while n := f.readinto(buf):
            hasher.update(buf[:n])
            total += n
            if on_bytes is not None:
                on_bytes(n)
        after = os.fstat(f.fileno())
    same = Stamp.of(before) == Stamp.of(after) and total == after.st_size
    return hasher.hexdigest(), total, Stamp.of(after) if same else None


def hash_entry(
    root: Path, entry: FileEntry, reporter: Reporter
) -> tuple[FileVerdict, Stamp | None]:
    try:
        digest, size, stamp = hash_file(
            root / entry.path,
            entry.algorithm,
            on_bytes=lambda n: reporter.advance(entry.path, n),
        )
    except FileNotFoundError:
        return FileVerdict(entry.path, Status.MISSING, "vanished while verifying"), None
    except OSError as exc:
        return FileVerdict(entry.path, Status.BAD, f"unreadable: {exc.strerror or exc}"), None
    verdict = judge(entry, digest, size=size)
    if stamp is None and verdict.status is Status.OK:
        # The content read was right but the file changed meanwhile: prove it again next time.
        changed = FileVerdict(entry.path, Status.BAD, "changed while being verified", hashed=True)
        return changed, None
    return verdict, stamp if verdict.status is Status.OK else None


def default_workers() -> int:
    return max(1, len(os.sched_getaffinity(0)))


def verify_dir(
    root: Path,
    manifest: Manifest,
    *,
    full: bool = False,
    workers: int | None = None,
    reporter: Reporter | None = None,
) -> VerifyReport:
    """Verify `root` against `manifest`; the report's manifest carries the updated stamps
    (OK files: the stamp they verified at; BAD or MISSING files: none)."""
    reporter = reporter or NullReporter()
    scan = scan_model_dir(root)
    plan = plan_verify(manifest, scan.local, full=full, extra=scan.files)
    reporter.phase("verify", [(e.path, e.size, 0) for e in plan.to_hash])
    stamps: dict[str, Stamp | None] = {}
    for verdict in plan.settled:
        if verdict.status is not Status.OK:
            stamps[verdict.path] = None
        reporter.file_done(verdict)
    hashed: list[FileVerdict] = []
    if plan.to_hash:
        n = min(workers or default_workers(), len(plan.to_hash))
        with ThreadPoolExecutor(max_workers=n, thread_name_prefix="sparkd-hash") as pool:
            futures = [pool.submit(hash_entry, root, e, reporter) for e in plan.to_hash]
            for future in futures:
                verdict, stamp = future.result()
                stamps[verdict.path] = stamp
                hashed.append(verdict)
                reporter.file_done(verdict)
    extra = [FileVerdict(p, Status.EXTRA, "not in the manifest") for p in plan.extra]
    for verdict in extra:
        reporter.file_done(verdict)
    return VerifyReport(
        model=manifest.model,
        verdicts=merge_verdicts(plan.settled, hashed, extra),
        manifest=manifest.with_stamps(stamps),
        hashed_bytes=plan.hash_bytes,
    )
