"""sparkd.engine.warm: which files a warm swap evicts, and whether the target's pages stay."""

from __future__ import annotations

from pathlib import Path

from sparkd.engine.warm import ModelFile, decide_keep, plan_eviction
from sparkd.monitor.memory import GIB


def _file(name: str, ino: int, size: int = GIB) -> ModelFile:
    return ModelFile(Path("/models", name), size, (7, ino))


def test_eviction_skips_the_targets_files_and_takes_each_file_once() -> None:
    target = [_file("qwen/a.safetensors", 1), _file("qwen/tokenizer.json", 2, 4096)]
    others = [
        # A draft model that shares qwen's tokenizer by hard link (or a Hub blob): qwen's.
        ("draft", [_file("draft/w.safetensors", 3), _file("draft/tokenizer.json", 2, 4096)]),
        ("llama", [_file("llama.gguf", 4, 20 * GIB)]),
        # Another name for the same GGUF: once.
        ("llama-q4", [_file("llama-link.gguf", 4, 20 * GIB)]),
        ("empty", []),
    ]
    eviction = plan_eviction(target, others)
    assert [f.path.name for f in eviction.files] == ["w.safetensors", "llama.gguf"]
    assert eviction.models == ("draft", "llama")
    assert eviction.shared == 1
    assert eviction.size == 21 * GIB


def test_no_other_models_evicts_nothing() -> None:
    eviction = plan_eviction([_file("qwen/a", 1)], [])
    assert (eviction.files, eviction.models, eviction.size) == ((), (), 0)


def _decide(cached: int, available: int, memory_gib: float = 40, reserve_gib: float = 4) -> (
    bool
):
    verdict = decide_keep(
        model="qwen", target_cached=cached, available=available,
        need=round((memory_gib + reserve_gib) * GIB), memory_gib=memory_gib,
        reserve_gib=reserve_gib,
    )
    assert verdict.left == available - cached
    return verdict.keep


def test_keep_only_when_memory_without_the_cached_pages_covers_the_need() -> None:
    assert _decide(30 * GIB, 74 * GIB)  # 74 - 30 = 44 = 40 + 4: exactly enough
    assert not _decide(30 * GIB + 1, 74 * GIB)  # a byte short
    assert _decide(1, 100 * GIB)
    assert not _decide(0, 100 * GIB)  # nothing cached: nothing to keep


def test_the_lines_name_the_numbers() -> None:
    kept = decide_keep(model="qwen", target_cached=30 * GIB, available=100 * GIB,
                       need=44 * GIB, memory_gib=40, reserve_gib=4)
    assert kept.line == (
        "warm: kept 30.0 GiB of qwen's files in the page cache: MemAvailable 100.0 GiB - "
        "30.0 GiB of qwen's files cached = 70.0 GiB covers 40.0 GiB + 4.0 GiB reserve"
    )
    empty = decide_keep(model="qwen", target_cached=0, available=100 * GIB, need=44 * GIB,
                        memory_gib=40, reserve_gib=4)
    assert empty.line == ("warm: not kept: qwen has nothing cached; dropping the whole page "
                          "cache")
