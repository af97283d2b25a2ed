from __future__ import annotations

import contextlib
import shutil
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparkd.monitor.psi import PsiError, parse_psi, read_pressure

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "psi"


def test_real_readings_parse() -> None:
    io = parse_psi((FIXTURES / "io.txt").read_text())
    assert io.full is not None and io.some.total_us >= io.full.total_us
    thrash = parse_psi((FIXTURES / "memory-thrashing.txt").read_text())
    assert thrash.full is not None and thrash.full.avg10 == 28.5
    assert thrash.to_json() == {"some_avg10": 41.27, "some_avg60": 22.1,
                                "full_avg10": 28.5, "full_avg60": 14.02}


def test_old_kernel_cpu_without_full_line() -> None:
    p = parse_psi("some avg10=1.00 avg60=2.00 avg300=3.00 total=4\n")
    assert p.full is None and p.to_json() == {"some_avg10": 1.0, "some_avg60": 2.0}


def test_malformed_is_a_clear_error() -> None:
    with pytest.raises(PsiError, match="malformed PSI line"):
        parse_psi("some avg10=x avg60=1 avg300=1 total=1")
    with pytest.raises(PsiError, match="no 'some' line"):
        parse_psi("")


@given(st.text())
def test_parser_raises_only_psi_error(text: str) -> None:
    with contextlib.suppress(PsiError):
        parse_psi(text)


def test_read_pressure_from_a_directory(tmp_path: Path) -> None:
    for name in ("cpu", "memory"):
        shutil.copy(FIXTURES / f"{name}.txt", tmp_path / name)
    (tmp_path / "io").write_text("garbage")
    got = read_pressure(tmp_path)
    assert sorted(got) == ["cpu", "memory"]  # an unreadable resource is left out
    assert read_pressure(tmp_path / "none") == {}
