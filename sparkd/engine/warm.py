"""Warm swaps: which model files prestart evicts from the page cache, and whether the target's
cached pages may stay (pure; the I/O is sparkd.engine.pagecache, the steps sparkd.engine.prestart).

Reloading a model whose files are still in the page cache takes seconds instead of a read from
disk (llama.cpp issue 17833); a blanket drop throws that away. So prestart:

1. measures how much of the target's files is cached; nothing: the blanket drop, as before
   (simpler, and nothing warm is lost);
2. otherwise evicts the files of every *other* model in the accepted config
   (`posix_fadvise(DONTNEED)` per file; a file the target shares, by inode, is the target's);
3. keeps the target's cached pages only when MemAvailable without them still covers
   memory_gib + the reserve (`decide_keep`): on unified memory (GB10) the cached copy and the
   loaded copy both occupy memory, so the kept pages count as used. Otherwise it drops
   everything, as before. The memory gate then counts what was kept as used.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sparkd.monitor.memory import format_size, gib

FileKey = tuple[int, int]  # (st_dev, st_ino): one file however many paths lead to it


@dataclass(frozen=True, slots=True)
class ModelFile:
    path: Path
    size: int
    key: FileKey


@dataclass(frozen=True, slots=True)
class Eviction:
    """The other models' files to evict: each file once, none of the target's."""

    files: tuple[ModelFile, ...]
    models: tuple[str, ...]  # the other models that have files
    shared: int = 0  # files skipped because the target has them too

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)


def plan_eviction(
    target: Sequence[ModelFile], others: Iterable[tuple[str, Sequence[ModelFile]]]
) -> Eviction:
    """The files of `others` (model name, its files) that are not the target's, each once."""
    keep = {f.key for f in target}
    seen: set[FileKey] = set()
    files: list[ModelFile] = []
    models: list[str] = []
    shared = 0
    for model, model_files in others:
        mine = False
        for f in model_files:
            if f.key in keep:
                shared += 1
                continue
            if f.key in seen:
                continue
            seen.add(f.key)
            files.append(f)
            mine = True
        if mine:
            models.append(model)
    return Eviction(files=tuple(files), models=tuple(models), shared=shared)


@dataclass(frozen=True, slots=True)
class KeepVerdict:
    """Whether the target's cached pages stay. `line` says why, with the numbers."""

    keep: bool
    target_cached: int
    available: int  # MemAvailable when deciding
    need: int  # memory_gib + reserve, in bytes
    line: str

    @property
    def left(self) -> int:
        """MemAvailable with the target's cached pages counted as used."""
        return self.available - self.target_cached


KEEP_PREFIX: Final = "warm:"


def decide_keep(
    *, model: str, target_cached: int, available: int, need: int, memory_gib: float,
    reserve_gib: float,
) -> KeepVerdict:
    """Keep the target's `target_cached` bytes when `available` less them still covers `need`."""
    left = available - target_cached
    sums = (
        f"MemAvailable {gib(available)} GiB - {format_size(target_cached)} of {model}'s files "
        f"cached = {gib(left)} GiB"
    )
    wanted = f"{memory_gib:.1f} GiB + {reserve_gib:.1f} GiB reserve"
    if target_cached > 0 and left >= need:
        return KeepVerdict(
            keep=True, target_cached=target_cached, available=available, need=need,
            line=f"{KEEP_PREFIX} kept {format_size(target_cached)} of {model}'s files in the "
                 f"page cache: {sums} covers {wanted}",
        )
    why = (f"{model} has nothing cached" if target_cached <= 0
           else f"{sums} does not cover {wanted}")
    return KeepVerdict(
        keep=False, target_cached=target_cached, available=available, need=need,
        line=f"{KEEP_PREFIX} not kept: {why}; dropping the whole page cache",
    )
