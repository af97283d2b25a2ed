"""The memory floor's pure rule (sparkd.monitor.floor) on /proc/meminfo fixtures, and its two
readers on real files."""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from sparkd.monitor.floor import (
    GIB,
    Culprit,
    EngineMemory,
    FloorCount,
    FloorReadError,
    FloorRule,
    available_bytes,
    cgroup_of,
    culprit,
    floor_step,
    next_reading_in,
    read_available,
    read_cgroup_memory,
    read_engine_memory,
)
from sparkd.monitor.memory import parse_meminfo

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "meminfo"
HOST = (FIXTURES / "host-x86_64-container.txt").read_text()


def with_available(text: str, kib: int) -> str:
    return re.sub(r"^MemAvailable:\s+\d+ kB$", f"MemAvailable:   {kib} kB", text, flags=re.M)


@pytest.mark.parametrize("name", ["host-x86_64-container.txt", "gb10-after-model-run.txt"])
def test_the_fast_reader_agrees_with_the_full_parser(name: str) -> None:
    text = (FIXTURES / name).read_text()
    assert available_bytes(text) == parse_meminfo(text).available


def test_the_real_meminfo_is_read() -> None:
    assert 0 < read_available() <= parse_meminfo(Path("/proc/meminfo").read_text()).total


@pytest.mark.parametrize("text", ["", "MemTotal: 1 kB\n", "MemAvailable:\n", "MemAvailable: x kB"])
def test_no_memavailable_is_a_clear_error(text: str) -> None:
    with pytest.raises(FloorReadError, match="MemAvailable"):
        available_bytes(text)


def ramp(start_gib: float, step_gib: float, n: int) -> list[int]:
    """MemAvailable readings of the host fixture while something allocates step_gib a reading."""
    return [available_bytes(with_available(HOST, int((start_gib - i * step_gib) * (1 << 20))))
            for i in range(n)]


def run(rule: FloorRule, readings: list[int]) -> list[FloorCount]:
    count, out = FloorCount(), []
    for i, available in enumerate(readings):
        count = floor_step(count, rule, available, float(i))
        out.append(count)
    return out


def test_trips_after_n_readings_in_a_row_under_the_floor() -> None:
    # 8, 6, 4, 2, 0.5 GiB: under the 4 GiB floor from the fourth reading (2 GiB) on.
    counts = run(FloorRule(4 * GIB, samples=2), ramp(8, 2, 4) + ramp(0.5, 0, 1))
    assert [c.trip for c in counts] == [False, False, False, False, True]
    assert counts[-1].first_under_t == 3.0  # when the run under the floor began
    assert counts[-1].under == 0  # counted again from the next reading


def test_at_the_floor_is_not_under_it_and_a_reading_above_clears_the_count() -> None:
    rule = FloorRule(4 * GIB, samples=2)
    readings = [4 * GIB, 3 * GIB, 5 * GIB, 3 * GIB, 5 * GIB, 3 * GIB]
    assert not any(c.trip for c in run(rule, readings))


def test_a_zero_floor_never_trips() -> None:
    assert FloorRule(0).disabled
    assert not any(c.trip for c in run(FloorRule(0, samples=1), [0, 0, 0]))


def test_the_engine_that_grew_most_is_chosen_over_the_biggest() -> None:
    found = culprit({
        "big": EngineMemory(current=60 * GIB, baseline=60 * GIB),
        "grower": EngineMemory(current=20 * GIB, baseline=5 * GIB),
        "shrinker": EngineMemory(current=1 * GIB, baseline=2 * GIB),
    })
    assert found == Culprit("grower", 20 * GIB, 15 * GIB, "grew most")


def test_without_growth_the_engine_that_holds_most_is_chosen() -> None:
    found = culprit({"a": EngineMemory(3 * GIB, None), "b": EngineMemory(9 * GIB, 9 * GIB),
                     "c": EngineMemory(None, 1)})
    assert found == Culprit("b", 9 * GIB, 0, "holds most")


def test_ties_go_to_the_first_name_and_no_reading_means_no_culprit() -> None:
    same = EngineMemory(2 * GIB, GIB)
    assert culprit({"b": same, "a": same}) == Culprit("a", 2 * GIB, GIB, "grew most")
    assert culprit({"a": EngineMemory(None, GIB)}) is None
    assert culprit({}) is None


def test_cgroup_of_reads_the_unified_line() -> None:
    text = "12:cpu:/old\n0::/system.slice/sparkd-engine@a.service\n"
    assert cgroup_of(text) == "/system.slice/sparkd-engine@a.service"
    assert cgroup_of("3:memory:/x\n") is None


def test_cgroup_memory_is_read_through_proc(tmp_path: Path) -> None:
    proc, root = tmp_path / "proc", tmp_path / "cg"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text("0::/system.slice/sparkd-engine@a.service\n")
    unit = root / "system.slice" / "sparkd-engine@a.service"
    unit.mkdir(parents=True)
    (unit / "memory.current").write_text("123456789\n")
    assert read_cgroup_memory(42, proc=str(proc), root=str(root)) == 123456789
    assert read_cgroup_memory(43, proc=str(proc), root=str(root)) is None  # gone


def test_without_a_memory_controller_the_resident_set_is_read(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    (proc / "42").mkdir(parents=True)
    (proc / "42" / "cgroup").write_text("0::/system.slice/x.service\n")
    (proc / "42" / "statm").write_text("1000 300 20 1 0 50 0\n")
    assert read_engine_memory(42, proc=str(proc), root=str(tmp_path / "none")) == (
        300 * os.sysconf("SC_PAGE_SIZE"))
    assert read_engine_memory(43, proc=str(proc), root=str(tmp_path)) is None


def test_own_cgroup_memory_on_this_machine() -> None:
    """The real /proc and /sys/fs/cgroup: this process's cgroup, where the memory controller
    shows it (a container may hide it: then None, never an error)."""
    path = cgroup_of(Path(f"/proc/{os.getpid()}/cgroup").read_text())
    current = Path(f"/sys/fs/cgroup{path}/memory.current")
    value = read_cgroup_memory(os.getpid())
    if current.exists():
        assert value is not None and value > 0
    else:
        assert value is None


def test_readings_come_faster_as_memory_nears_the_floor() -> None:
    rule = FloorRule(4 * GIB, samples=2)
    assert next_reading_in(100 * GIB, rule, 0.1) == 1.0  # far above: once a second
    assert next_reading_in(8 * GIB, rule, 0.1) == 0.5  # 4 GiB of headroom at 8 GiB/s
    assert next_reading_in(4 * GIB + GIB // 2, rule, 0.1) == 0.1  # near: the configured pace
    assert next_reading_in(GIB, rule, 0.1) == 0.1  # under: counting
    assert next_reading_in(100 * GIB, rule, 2.0) == 2.0  # never faster than configured
    assert next_reading_in(0, FloorRule(0), 0.1) == 1.0  # off: the loop idles
