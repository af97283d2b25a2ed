"""Bring the unit directory in line with the rendered units; daemon-reload only on change.

`plan_reconcile` is the pure decision; `reconcile` reads the directory, applies the plan and
calls `reload` (the caller's `systemctl daemon-reload`) exactly once when something changed.

Safety rules:
- only files named `sparkd-engine@*.service` are considered at all;
- a file is rewritten or removed only when it carries GENERATED_MARKER; any other file with
  that name (hand-written, a symlink such as a mask to /dev/null, a directory) is *foreign*: it
  is left alone and reported, even when a model of that name is configured;
- writes are atomic (temporary file in the same directory, fsync, rename, fsync of the
  directory) with mode 0644, and only files whose content differs are written.
"""

from __future__ import annotations

import contextlib
import fnmatch
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sparkd.engine.unit import UNIT_GLOB
from sparkd.units.render import is_generated

UNIT_FILE_MODE: Final = 0o644
_TMP_SUFFIX: Final = ".sparkd-tmp"
# Temporary files are hidden (".NAME.XXXX.sparkd-tmp"): systemd ignores them, and a
# leftover from a crash is recognisably ours and removed on the next run.
_TMP_GLOB: Final = f".{UNIT_GLOB}.*{_TMP_SUFFIX}"


@dataclass(frozen=True, slots=True)
class ReconcilePlan:
    """What to do, by file name. Every tuple is sorted."""

    write: tuple[str, ...]
    unchanged: tuple[str, ...]
    remove: tuple[str, ...]
    foreign: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.write or self.remove)


@dataclass(frozen=True, slots=True)
class ReconcileResult:
    """What was done, by file name. Every tuple is sorted."""

    written: tuple[str, ...]
    unchanged: tuple[str, ...]
    removed: tuple[str, ...]
    foreign: tuple[str, ...]

    @property
    def changed(self) -> bool:
        return bool(self.written or self.removed)


def is_unit_name(name: str) -> bool:
    """Whether a file name is one sparkd manages (`sparkd-engine@*.service`, no directory)."""
    return "/" not in name and fnmatch.fnmatchcase(name, UNIT_GLOB)


def plan_reconcile(existing: Mapping[str, str | None], desired: Mapping[str, str]) -> ReconcilePlan:
    """Decide, without touching anything.

    `existing` maps each matching file in the unit directory to its text, or None when it is
    not a regular file (or cannot be read): such entries are foreign. `desired` maps file name
    to the text it should have; every desired text must carry GENERATED_MARKER.
    """
    for name, text in desired.items():
        if not is_unit_name(name):
            raise ValueError(f"not an engine unit file name: {name!r}")
        if not is_generated(text):
            raise ValueError(f"{name}: desired text lacks the generated-unit marker")
    write: list[str] = []
    unchanged: list[str] = []
    remove: list[str] = []
    foreign: list[str] = []
    for name in sorted(set(existing) | set(desired)):
        if not is_unit_name(name):
            continue
        have = existing.get(name)
        ours = name not in existing or (have is not None and is_generated(have))
        if not ours:
            foreign.append(name)
        elif name not in desired:
            remove.append(name)
        elif have == desired[name]:
            unchanged.append(name)
        else:
            write.append(name)
    return ReconcilePlan(tuple(write), tuple(unchanged), tuple(remove), tuple(foreign))


def read_existing(unit_dir: Path) -> dict[str, str | None]:
    """Matching files in `unit_dir`: text for regular files, None for anything else."""
    found: dict[str, str | None] = {}
    try:
        entries = list(os.scandir(unit_dir))
    except FileNotFoundError:
        return found
    for entry in entries:
        if not is_unit_name(entry.name):
            continue
        found[entry.name] = None
        if entry.is_file(follow_symlinks=False):
            with contextlib.suppress(OSError):  # unreadable: foreign, left alone
                found[entry.name] = Path(entry.path).read_text(
                    encoding="utf-8", errors="surrogateescape"
                )
    return found


def reconcile(
    unit_dir: Path, desired: Mapping[str, str], *, reload: Callable[[], None]
) -> ReconcileResult:
    """Write changed units, remove sparkd's units that are no longer desired, reload once.

    When `reload` raises, the files are already in place and the exception propagates; a
    second run would find nothing to change, so the caller must retry the reload itself.
    """
    unit_dir.mkdir(mode=0o755, parents=True, exist_ok=True)
    _remove_stale_temporaries(unit_dir)
    plan = plan_reconcile(read_existing(unit_dir), desired)
    for name in plan.write:
        _write_atomic(unit_dir, name, desired[name])
    for name in plan.remove:
        with contextlib.suppress(FileNotFoundError):
            (unit_dir / name).unlink()
    if plan.changed:
        _fsync_dir(unit_dir)
        reload()
    return ReconcileResult(
        written=plan.write, unchanged=plan.unchanged, removed=plan.remove, foreign=plan.foreign
    )


def _write_atomic(unit_dir: Path, name: str, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=_TMP_SUFFIX, dir=unit_dir)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(text.encode("utf-8"))
            f.flush()
            os.fchmod(f.fileno(), UNIT_FILE_MODE)
            os.fsync(f.fileno())
        os.replace(tmp, unit_dir / name)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _remove_stale_temporaries(unit_dir: Path) -> None:
    for entry in os.scandir(unit_dir):
        if fnmatch.fnmatchcase(entry.name, _TMP_GLOB) and entry.is_file(follow_symlinks=False):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(entry.path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


__all__ = [
    "UNIT_FILE_MODE",
    "ReconcilePlan",
    "ReconcileResult",
    "is_unit_name",
    "plan_reconcile",
    "read_existing",
    "reconcile",
]
