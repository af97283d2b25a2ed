"""sparkd.engine.prestart against a fake system: the steps, their log lines, and the memory gate."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from click.testing import CliRunner

from sparkd.config import parse_config
from sparkd.engine.prestart import (
    PrestartPlan,
    command,
    memory_gate,
    plan_prestart,
    read_stopped_stamp,
    run_prestart,
    settle_needed,
)
from sparkd.engine.warm import ModelFile
from sparkd.errors import PrestartRefused, UnknownModel
from sparkd.monitor.memory import GIB, MIB, MemInfo, SettleRule, SettleState

MODEL_PATH = Path("/models/qwen")
FILES = {
    MODEL_PATH / "config.json": 4096,
    MODEL_PATH / "model-00001-of-00002.safetensors": 40 * GIB,
    MODEL_PATH / "model-00002-of-00002.safetensors": 30 * GIB,
}
OTHER_PATH = Path("/models/llama")
OTHER_FILES = {
    OTHER_PATH / "llama.gguf": 20 * GIB,
}


def _key(path: Path) -> tuple[int, int]:
    return (1, hash(path) & 0xFFFFFFFF)


@dataclass
class FakeSystem:
    """Unified memory as three numbers: free, page cache, and memory an exited engine is still
    giving back (one `returning` entry per meminfo read after the drop)."""

    total: int = 128 * GIB
    free: int = 20 * GIB
    cache: int = 90 * GIB
    dirty: int = 200 * MIB
    drop_permitted: bool = True
    files: dict[Path, int] = field(default_factory=lambda: dict(FILES))
    other_files: dict[Path, int] = field(default_factory=lambda: dict(OTHER_FILES))
    # Bytes of each file in the page cache (part of `cache`); a file not here is taken as
    # wholly cached by the fadvise fallback (the fallback tests' assumption).
    cached: dict[Path, int] = field(default_factory=dict)
    fadvise_fails: set[Path] = field(default_factory=set)
    returning: list[int] = field(default_factory=list)
    now: float = 1000.0
    drop_cost_s: float = 0.085
    calls: list[str] = field(default_factory=list)
    sleeps: list[float] = field(default_factory=list)
    dropped: bool = False

    def sync(self) -> None:
        self.calls.append("sync")
        self.dirty = 0
        self.now += 0.003

    def drop_caches(self) -> None:
        self.calls.append("drop_caches")
        self.now += self.drop_cost_s
        if not self.drop_permitted:
            raise PermissionError(13, "Permission denied")
        self.free += self.cache
        self.cache = 0
        self.cached.clear()
        self.dropped = True

    def regular_files(self, root: Path) -> list[tuple[Path, int]]:
        self.calls.append(f"list {root}")
        if root != MODEL_PATH:
            raise FileNotFoundError(root)
        return list(self.files.items())

    def fadvise_dontneed(self, path: Path) -> None:
        self.calls.append(f"fadvise {path.name}")
        self.now += 0.001
        if path in self.fadvise_fails:
            raise PermissionError(13, "Permission denied")
        evicted = min(self.cache, self.cached.pop(path, self.files.get(path, 0)))
        self.cache -= evicted
        self.free += evicted
        self.dropped = True

    def model_files(self, root: Path) -> list[ModelFile]:
        self.calls.append(f"files {root}")
        files = self.files if root == MODEL_PATH else self.other_files
        return [ModelFile(p, n, _key(p)) for p, n in files.items() if p.is_relative_to(root)]

    def cached_bytes(self, path: Path) -> int:
        return self.cached.get(path, 0)

    def read_meminfo(self) -> MemInfo:
        if self.dropped and self.returning:
            self.free += self.returning.pop(0)
        return MemInfo(
            total=self.total,
            free=self.free,
            available=self.free + self.cache,
            cached=self.cache,
            dirty=self.dirty,
            swap_total=16 * GIB,
            swap_free=16 * GIB,
        )

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    def monotonic(self) -> float:
        return self.now


def _plan(memory_gib: float = 70.0, *, reserve_gib: float = 4.0, timeout_s: float = 30.0) -> (
    PrestartPlan
):
    return PrestartPlan(
        model="qwen",
        model_path=MODEL_PATH,
        memory_gib=memory_gib,
        reserve_gib=reserve_gib,
        settle=SettleRule(timeout_s=timeout_s),
        others=(("llama", OTHER_PATH),),
    )


def _run(plan: PrestartPlan, system: FakeSystem) -> tuple[list[str], Exception | None]:
    lines: list[str] = []
    try:
        run_prestart(plan, system, lines.append)
    except PrestartRefused as exc:
        return lines, exc
    return lines, None


def _line(lines: list[str], step: str) -> str:
    (found,) = [line for line in lines if line.startswith(f"prestart qwen: {step}")]
    return found


def test_drop_works() -> None:
    system = FakeSystem()
    lines, refused = _run(_plan(), system)
    assert refused is None
    # Nothing of qwen's is cached (the fake's default): the blanket drop, as before.
    assert system.calls[:3] == ["sync", f"files {MODEL_PATH}", "drop_caches"]
    assert not any(c.startswith(("fadvise", "list")) for c in system.calls)
    assert _line(lines, "sync:") == (
        "prestart qwen: sync: flushed dirty pages (200 MiB before, 0 B after) in 3 ms"
    )
    assert _line(lines, "drop_caches:") == (
        "prestart qwen: drop_caches: freed 90.0 GiB of page cache in 85 ms "
        "(110.0 GiB free, 0 B cached)"
    )
    assert [line.split(":")[1].strip() for line in lines] == [
        "sync", "page cache", "drop_caches", "settle", "memory gate"
    ]


def test_drop_not_permitted_falls_back_to_fadvise_on_each_file() -> None:
    system = FakeSystem(drop_permitted=False)
    lines, refused = _run(_plan(), system)
    assert refused is None
    advised = [c.removeprefix("fadvise ") for c in system.calls if c.startswith("fadvise")]
    assert sorted(advised) == sorted(p.name for p in FILES)
    assert f"list {MODEL_PATH}" in system.calls
    assert _line(lines, "drop_caches:") == (
        "prestart qwen: drop_caches: /proc/sys/vm/drop_caches not writable "
        "(PermissionError: Permission denied); fell back to posix_fadvise(DONTNEED) on 3 files "
        "(70.0 GiB) under /models/qwen (other page cache stays): freed 70.0 GiB of page cache "
        "in 88 ms (90.0 GiB free, 20.0 GiB cached)"
    )


def test_fadvise_failures_are_counted_and_named() -> None:
    bad = MODEL_PATH / "config.json"
    system = FakeSystem(drop_permitted=False, fadvise_fails={bad})
    lines, _ = _run(_plan(), system)
    line = _line(lines, "drop_caches:")
    assert "on 2 files (70.0 GiB)" in line
    assert f"1 could not be advised (first: {bad}: PermissionError: Permission denied)" in line


def test_fallback_with_missing_model_path_says_so() -> None:
    system = FakeSystem(drop_permitted=False)
    plan = PrestartPlan(
        model="qwen", model_path=Path("/nowhere"), memory_gib=1, reserve_gib=4,
        settle=SettleRule(),
    )
    lines, _ = _run(plan, system)
    assert "the model path /nowhere does not exist, nothing advised: freed 0 B" in _line(
        lines, "drop_caches:"
    )


def test_settle_waits_until_memory_stops_coming_back() -> None:
    # An engine that just exited gives back 3 + 2 + 1 GiB over three reads, then nothing.
    system = FakeSystem(returning=[0, 3 * GIB, 2 * GIB, GIB])
    plan = _plan()
    lines, refused = _run(plan, system)
    assert refused is None
    # Reads after the drop: the first sample, three rising, then a quiet window of four.
    assert system.sleeps == [plan.interval_s] * 6
    assert _line(lines, "settle:") == (
        "prestart qwen: settle: MemAvailable settled at 116.0 GiB in 900 ms (+6.0 GiB while "
        "waiting)"
    )
    assert "116.0 GiB available" in _line(lines, "memory gate:")


def test_settle_times_out_and_goes_on() -> None:
    system = FakeSystem(returning=[GIB] * 1000)
    lines, refused = _run(_plan(timeout_s=3.0), system)
    assert refused is None
    assert sum(system.sleeps) == pytest.approx(3.0, abs=0.2)
    line = _line(lines, "settle:")
    assert line.startswith("prestart qwen: settle: MemAvailable still rising after 3.0 s (+3.0 GiB")
    assert line.endswith("going on to the memory gate")


def test_settle_skipped_with_zero_timeout() -> None:
    system = FakeSystem()
    lines, _ = _run(_plan(timeout_s=0), system)
    assert system.sleeps == []
    assert _line(lines, "settle:") == "prestart qwen: settle: skipped (daemon.settle_timeout_s = 0)"


def test_settle_skipped_when_no_engine_stopped_lately() -> None:
    system = FakeSystem(returning=[0, 3 * GIB])
    plan = replace(_plan(), settle_skip="no sparkd engine stopped in the last 30 s")
    lines, refused = _run(plan, system)
    assert refused is None and system.sleeps == []
    assert _line(lines, "settle:") == (
        "prestart qwen: settle: skipped (no sparkd engine stopped in the last 30 s)")


def test_settle_needed_only_after_an_engine_stopped_lately(tmp_path: Path) -> None:
    # No engine stopped since boot (no stamp): nothing gives memory back.
    assert read_stopped_stamp(tmp_path / "engine-stopped") is None
    assert settle_needed(None, now=100.0, timeout_s=30) is None
    # One stopped (or crashed) 2 s ago: its memory may still be coming back.
    assert settle_needed(98.0, now=100.0, timeout_s=30) == "an engine stopped 2.0 s ago"
    # ...31 s ago it is long back; a clock that stepped back settles.
    assert settle_needed(69.0, now=100.0, timeout_s=30) is None
    assert settle_needed(105.0, now=100.0, timeout_s=30) == "an engine stopped 0.0 s ago"
    stamp = tmp_path / "engine-stopped"
    stamp.touch()
    stopped_at = read_stopped_stamp(stamp)
    assert stopped_at is not None and settle_needed(stopped_at, now=time.time(),
                                                    timeout_s=30) is not None


def test_gate_refuses_with_the_exact_message() -> None:
    # Other GPU work holds memory that no drop gives back: 52.3 GiB available after the drop.
    system = FakeSystem(free=int(52.3 * GIB), cache=0)
    lines, refused = _run(_plan(70.0), system)
    assert isinstance(refused, PrestartRefused)
    assert refused.code == "prestart-refused"
    assert refused.message == (
        "prestart qwen: refused: needs 70.0 GiB + 4.0 GiB reserve, 52.3 GiB available "
        "(stop other GPU work or lower memory_gib)"
    )
    assert not any("memory gate" in line for line in lines)


def test_gate_passes() -> None:
    system = FakeSystem()
    lines, refused = _run(_plan(70.0), system)
    assert refused is None
    assert lines[-1] == (
        "prestart qwen: memory gate: ok: needs 70.0 GiB + 4.0 GiB reserve, 110.0 GiB available "
        "(110.0 GiB free)"
    )


def test_gate_boundary_and_swap() -> None:
    plan = _plan(70.0)
    exact = MemInfo(total=128 * GIB, free=74 * GIB, available=74 * GIB)
    assert memory_gate(plan, exact).admitted
    # One byte short: refused, however much swap there is.
    short = MemInfo(
        total=128 * GIB, free=74 * GIB - 1, available=74 * GIB - 1,
        swap_total=64 * GIB, swap_free=64 * GIB,
    )
    assert not memory_gate(plan, short).admitted


def test_gate_warns_when_page_cache_makes_up_the_difference() -> None:
    mem = MemInfo(total=128 * GIB, free=20 * GIB, available=100 * GIB, cached=80 * GIB)
    verdict = memory_gate(_plan(70.0), mem)
    assert verdict.admitted
    assert verdict.line.endswith(
        "; warning: only 20.0 GiB is free, the rest is page cache that CUDA on GB10 counts as used"
    )


CONFIG = """
[daemon]
memory_reserve_gib = 6
settle_timeout_s = 12

[models.qwen]
engine = "vllm"
path = "/models/qwen"
port = 8201
memory_gib = 70
"""


def test_plan_from_config() -> None:
    config = parse_config(CONFIG, source=Path("/etc/sparkd.toml"))
    plan = plan_prestart(config, "qwen")
    assert plan.model_path == MODEL_PATH
    assert (plan.memory_gib, plan.reserve_gib) == (70.0, 6.0)
    assert plan.need_bytes == 76 * GIB
    assert plan.settle.timeout_s == 12.0
    with pytest.raises(UnknownModel, match="unknown model 'llama'"):
        plan_prestart(config, "llama")


def test_report_values() -> None:
    system = FakeSystem()
    report = run_prestart(_plan(), system, lambda _line: None)
    assert report.drop.method == "drop_caches"
    assert report.drop.freed == 90 * GIB
    assert report.settle is SettleState.SETTLED
    assert report.meminfo.available == 110 * GIB
    assert len(report.lines) == 5
    assert (report.kept, report.evicted) == (0, None)


def test_cli_config_error_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "sparkd.toml"
    path.write_text("[models.qwen]\nengine = 'vllm'\nport = 'x'\n")
    result = CliRunner().invoke(command, ["--config", str(path), "qwen"])
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"{path}: models.qwen.port: expected an integer from 1 to 65535, got \"x\""
    )


def test_cli_unknown_model_exits_2(tmp_path: Path) -> None:
    path = tmp_path / "sparkd.toml"
    path.write_text(CONFIG)
    result = CliRunner().invoke(command, ["--config", str(path), "llama"])
    assert result.exit_code == 2
    assert result.stderr.strip() == f"unknown model 'llama' (configured in {path}: qwen)"


# --- warm swaps ---------------------------------------------------------------------------------

FIRST = MODEL_PATH / "model-00001-of-00002.safetensors"
GGUF = OTHER_PATH / "llama.gguf"


def _warm_system(**kwargs: object) -> FakeSystem:
    """90 GiB cached: 40 GiB of qwen's first shard, all 20 GiB of llama's GGUF, 30 GiB else."""
    return FakeSystem(cached={FIRST: 40 * GIB, GGUF: 20 * GIB}, **kwargs)  # type: ignore[arg-type]


def test_warm_keeps_the_targets_pages_and_evicts_the_other_models() -> None:
    system = _warm_system()
    lines, refused = _run(_plan(40.0), system)
    assert refused is None
    assert "drop_caches" not in system.calls
    assert [c for c in system.calls if c.startswith("fadvise")] == ["fadvise llama.gguf"]
    assert system.cached == {FIRST: 40 * GIB}
    assert [line.split(":")[1].strip() for line in lines] == [
        "sync", "page cache", "evict", "settle", "warm", "memory gate"
    ]
    assert _line(lines, "page cache:") == (
        "prestart qwen: page cache: 40.0 GiB of qwen's 70.0 GiB of files cached: evicting the "
        "other models' files, keeping qwen's where memory allows"
    )
    assert _line(lines, "evict:") == (
        "prestart qwen: evict: posix_fadvise(DONTNEED) on 1 file (20.0 GiB) of the other models "
        "(llama): freed 20.0 GiB of page cache in 1 ms (40.0 GiB free, 70.0 GiB cached)"
    )
    assert _line(lines, "warm:") == (
        "prestart qwen: warm: kept 40.0 GiB of qwen's files in the page cache: MemAvailable "
        "110.0 GiB - 40.0 GiB of qwen's files cached = 70.0 GiB covers 40.0 GiB + 4.0 GiB "
        "reserve"
    )
    # The gate counts the kept pages as used (unified memory: cached and loaded copies both).
    assert _line(lines, "memory gate:").startswith(
        "prestart qwen: memory gate: ok: needs 40.0 GiB + 4.0 GiB reserve, 70.0 GiB available "
        "(MemAvailable 110.0 GiB less 40.0 GiB of qwen's files kept in the page cache)"
    )
    report = run_prestart(_plan(40.0), _warm_system(), lambda _line: None)
    assert report.kept == 40 * GIB
    assert report.drop.method == "evict" and report.evicted == report.drop
    assert report.drop.freed == 20 * GIB


def test_warm_drops_everything_when_the_kept_pages_would_not_leave_room() -> None:
    # 110 GiB available less 40 GiB cached = 70 GiB < 70 + 4 reserve: drop, as before.
    system = _warm_system()
    lines, refused = _run(_plan(70.0), system)
    assert refused is None
    assert system.calls.count("drop_caches") == 1 and system.cached == {}
    assert [line.split(":")[1].strip() for line in lines] == [
        "sync", "page cache", "evict", "settle", "warm", "drop_caches", "memory gate"
    ]
    assert _line(lines, "warm:") == (
        "prestart qwen: warm: not kept: MemAvailable 110.0 GiB - 40.0 GiB of qwen's files "
        "cached = 70.0 GiB does not cover 70.0 GiB + 4.0 GiB reserve; dropping the whole page "
        "cache"
    )
    assert _line(lines, "memory gate:").startswith(
        "prestart qwen: memory gate: ok: needs 70.0 GiB + 4.0 GiB reserve, 110.0 GiB available "
        "(110.0 GiB free)")
    report = run_prestart(_plan(70.0), _warm_system(), lambda _line: None)
    assert (report.kept, report.drop.method) == (0, "drop_caches")
    assert report.evicted is not None and report.evicted.freed == 20 * GIB


def test_warm_at_the_boundary() -> None:
    # Left after the kept pages: exactly memory_gib + reserve keeps; a byte less drops.
    system = _warm_system()
    lines, _ = _run(_plan(66.0), system)
    assert "prestart qwen: warm: kept" in _line(lines, "warm:")
    plan = replace(_plan(66.0), reserve_gib=4.0 + 1 / GIB)
    lines, _ = _run(plan, _warm_system())
    assert "prestart qwen: warm: not kept" in _line(lines, "warm:")


def test_nothing_of_the_target_cached_is_the_blanket_drop() -> None:
    system = FakeSystem(cached={GGUF: 20 * GIB})
    lines, refused = _run(_plan(), system)
    assert refused is None
    assert not any(c.startswith("fadvise") for c in system.calls)
    assert system.calls.count("drop_caches") == 1
    assert _line(lines, "page cache:") == (
        "prestart qwen: page cache: none of qwen's 70.0 GiB of files cached: dropping the whole "
        "page cache"
    )


def test_cold_plan_is_the_old_blanket_drop() -> None:
    system = _warm_system()
    lines, refused = _run(replace(_plan(40.0), warm=False), system)
    assert refused is None
    assert [line.split(":")[1].strip() for line in lines] == [
        "sync", "drop_caches", "settle", "memory gate"
    ]
    assert not any(c.startswith(("fadvise", "files")) for c in system.calls)
    assert system.cached == {}


def test_warm_without_drop_permission_evicts_the_target_too_when_not_kept() -> None:
    system = _warm_system(drop_permitted=False)
    lines, refused = _run(_plan(70.0), system)
    assert refused is None
    advised = [c.removeprefix("fadvise ") for c in system.calls if c.startswith("fadvise")]
    assert advised[0] == "llama.gguf"
    assert sorted(advised[1:]) == sorted(p.name for p in FILES)
    assert "fell back to posix_fadvise(DONTNEED) on 3 files" in _line(lines, "drop_caches:")


def test_gate_counts_kept_pages_as_used() -> None:
    plan = _plan(70.0)
    mem = MemInfo(total=128 * GIB, free=80 * GIB, available=110 * GIB, cached=30 * GIB)
    assert memory_gate(plan, mem).admitted
    assert memory_gate(plan, mem, kept=36 * GIB).admitted
    refused = memory_gate(plan, mem, kept=36 * GIB + 1)
    assert not refused.admitted
    assert refused.line == (
        "prestart qwen: refused: needs 70.0 GiB + 4.0 GiB reserve, 74.0 GiB available "
        "(MemAvailable 110.0 GiB less 36.0 GiB of qwen's files kept in the page cache) "
        "(stop other GPU work or lower memory_gib)"
    )


def test_plan_lists_the_other_models_each_path_once() -> None:
    config = parse_config(CONFIG + """
[models.llama]
engine = "llamacpp"
path = "/models/llama.gguf"
port = 8202

[models.qwen-again]
engine = "vllm"
path = "/models/qwen"
port = 8203

[models.llama-too]
engine = "llamacpp"
path = "/models/llama.gguf"
port = 8204
""", source=Path("/etc/sparkd.toml"))
    plan = plan_prestart(config, "qwen")
    assert plan.others == (("llama", Path("/models/llama.gguf")),)
    assert plan.warm
