"""sparkd.monitor.memory: /proc/meminfo parsing and the settle rule, over committed fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparkd.monitor.memory import (
    GIB,
    KIB,
    MIB,
    MemInfo,
    MemInfoError,
    Sample,
    SettleRule,
    SettleState,
    SettleTracker,
    assess_settle,
    format_size,
    meminfo_fields,
    parse_meminfo,
    read_meminfo,
)

FIXTURES = Path(__file__).parent.parent / "fixtures" / "meminfo"
HOST = FIXTURES / "host-x86_64-container.txt"
GB10 = FIXTURES / "gb10-after-model-run.txt"

MINIMAL = "MemTotal: 1000 kB\nMemFree: 200 kB\nMemAvailable: 600 kB\n"


def test_host_fixture_is_read_in_bytes() -> None:
    mem = read_meminfo(HOST)
    fields = meminfo_fields(HOST.read_text())
    assert mem.total == fields["MemTotal"] == 24683652 * KIB
    # Read just after a drop_caches: MemFree exceeds MemAvailable then (MemAvailable subtracts
    # the kernel's reserved watermarks), so neither bounds the other.
    assert mem.free > mem.available
    assert max(mem.free, mem.available) <= mem.total
    assert mem.page_cache == mem.buffers + mem.cached - mem.shmem
    # Counts without a unit stay counts.
    assert fields["HugePages_Total"] == 0
    assert fields["Hugepagesize"] == 2048 * KIB


def test_gb10_fixture_page_cache_and_swap() -> None:
    mem = read_meminfo(GB10)
    assert mem.total == 125_000_000 * KIB
    # ~90 GiB of droppable page cache, and MemAvailable counting it while MemFree does not:
    # the gap Disaster 1 fell into.
    assert 88 * GIB < mem.page_cache < 92 * GIB
    assert mem.free < 22 * GIB
    assert mem.available > 100 * GIB
    # Swap is read but never part of "available" (gpustack issue 5779).
    assert mem.swap_total == mem.swap_free == 16777212 * KIB
    assert mem.available == 116085584 * KIB
    assert mem.used == mem.total - mem.available


def test_constructed_fixture_says_so() -> None:
    assert GB10.read_text().startswith("# CONSTRUCTED")


def test_shmem_is_not_droppable_page_cache() -> None:
    mem = parse_meminfo(MINIMAL + "Buffers: 10 kB\nCached: 100 kB\nShmem: 30 kB\n")
    assert mem.cached == 100 * KIB
    assert mem.page_cache == 80 * KIB
    assert parse_meminfo(MINIMAL + "Cached: 10 kB\nShmem: 30 kB\n").page_cache == 0


@pytest.mark.parametrize("missing", ["MemTotal", "MemFree", "MemAvailable"])
def test_required_fields(missing: str) -> None:
    text = "\n".join(line for line in MINIMAL.splitlines() if not line.startswith(missing))
    with pytest.raises(MemInfoError, match=f"no {missing} line"):
        parse_meminfo(text)


def test_optional_fields_default_to_zero() -> None:
    assert parse_meminfo(MINIMAL) == MemInfo(total=1000 * KIB, free=200 * KIB, available=600 * KIB)


_KNOWN = {"MemTotal", "MemFree", "MemAvailable", "Buffers", "Cached", "Shmem", "Dirty",
          "SwapTotal", "SwapFree"}


def _not_a_known_field(line: str) -> bool:
    return not any(line.lstrip().startswith(name) for name in _KNOWN)


# Characters str.splitlines() splits on: a junk *line* holds none of them.
_LINE_BREAKS = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"


@given(
    junk=st.lists(
        st.text(alphabet=st.characters(exclude_characters=_LINE_BREAKS)).filter(
            _not_a_known_field
        ),
        max_size=20,
    ),
    data=st.data(),
)
def test_junk_lines_are_skipped(junk: list[str], data: st.DataObject) -> None:
    lines = HOST.read_text().splitlines()
    for line in junk:
        lines.insert(data.draw(st.integers(0, len(lines))), line)
    assert parse_meminfo("\n".join(lines)) == read_meminfo(HOST)


@given(st.text())
def test_parser_raises_only_meminfo_error(text: str) -> None:
    try:
        mem = parse_meminfo(text)
    except MemInfoError:
        return
    assert min(mem.total, mem.free, mem.available) >= 0


def test_format_size() -> None:
    assert format_size(0) == "0 B"
    assert format_size(36 * KIB) == "36 KiB"
    assert format_size(246 * MIB) == "246 MiB"
    assert format_size(int(1.25 * GIB)) == "1.2 GiB"
    assert format_size(-MIB) == "-1 MiB"


# --- settle -----------------------------------------------------------------------------------

TOTAL = 128 * GIB  # threshold: max(64 MiB, 0.5 % of 128 GiB = 655 MiB) = 655 MiB
RULE = SettleRule(window=4, timeout_s=5.0)


def _track(
    values: list[int], *, interval: float = 0.15, rule: SettleRule = RULE
) -> list[SettleState]:
    tracker = SettleTracker(total=TOTAL, rule=rule)
    return [tracker.add(i * interval, v).state for i, v in enumerate(values)]


def test_threshold_is_the_larger_of_bytes_and_fraction() -> None:
    assert RULE.threshold(TOTAL) == int(TOTAL * 0.005)
    assert RULE.threshold(4 * GIB) == 64 * MIB


def test_settles_once_a_full_window_is_quiet() -> None:
    base = 40 * GIB
    rising = [base + i * GIB for i in range(6)]  # 1 GiB per sample: an engine giving memory back
    flat = [rising[-1] + i * MIB for i in range(1, 5)]
    states = _track(rising + flat)
    # The first quiet window is the last rising sample plus three flat ones.
    settled_at = len(rising) + RULE.window - 2
    assert states[:settled_at] == [SettleState.SETTLING] * settled_at
    assert states[settled_at:] == [SettleState.SETTLED] * (len(states) - settled_at)


def test_needs_a_full_window() -> None:
    assert _track([GIB] * 3) == [SettleState.SETTLING] * 3
    assert _track([GIB] * 4)[-1] is SettleState.SETTLED


def test_falling_counts_as_settled() -> None:
    assert _track([10 * GIB, 9 * GIB, 8 * GIB, 7 * GIB])[-1] is SettleState.SETTLED


def test_times_out_while_still_rising() -> None:
    values = [i * GIB for i in range(100)]
    states = _track(values, interval=0.2)
    assert SettleState.SETTLED not in states
    first_timeout = states.index(SettleState.TIMED_OUT)
    assert first_timeout == round(RULE.timeout_s / 0.2)


def test_zero_timeout_times_out_at_once() -> None:
    assert _track([GIB], rule=SettleRule(timeout_s=0))[0] is SettleState.TIMED_OUT


def test_verdict_figures() -> None:
    samples = [Sample(0.0, 10 * GIB), Sample(0.2, 12 * GIB), Sample(0.4, 12 * GIB),
               Sample(0.6, 12 * GIB), Sample(0.8, 12 * GIB)]
    verdict = assess_settle(samples, total=TOTAL, rule=RULE)
    assert verdict.state is SettleState.SETTLED
    assert verdict.rise == 0
    assert verdict.total_rise == 2 * GIB
    assert verdict.waited_s == pytest.approx(0.8)
    assert verdict.available == 12 * GIB


def test_rejects_nonsense() -> None:
    with pytest.raises(ValueError, match="at least one sample"):
        assess_settle([], total=TOTAL, rule=RULE)
    with pytest.raises(ValueError, match="at least 2"):
        SettleRule(window=1)
    tracker = SettleTracker(total=TOTAL)
    tracker.add(1.0, GIB)
    with pytest.raises(ValueError, match="backwards"):
        tracker.add(0.5, GIB)


@given(
    steps=st.lists(st.integers(-4 * GIB, 4 * GIB), min_size=1, max_size=60),
    interval=st.floats(0.05, 0.5),
)
def test_settle_properties(steps: list[int], interval: float) -> None:
    values = [50 * GIB]
    for step in steps:
        values.append(max(0, values[-1] + step))
    tracker = SettleTracker(total=TOTAL, rule=RULE)
    states = []
    for i, v in enumerate(values):
        verdict = tracker.add(i * interval, v)
        states.append(verdict.state)
        # SETTLED exactly when a full window rose by less than the threshold.
        window = values[max(0, i - RULE.window + 1) : i + 1]
        quiet = len(window) == RULE.window and window[-1] - window[0] < verdict.threshold
        assert (verdict.state is SettleState.SETTLED) == quiet
        if not quiet:
            timed_out = verdict.waited_s >= RULE.timeout_s
            assert (verdict.state is SettleState.TIMED_OUT) == timed_out
