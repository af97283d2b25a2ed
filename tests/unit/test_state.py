from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparkd.errors import StateError
from sparkd.state import State, StateStore, parse_state, render_state

names = st.none() | st.text(min_size=1, max_size=20)


@given(desired=names, last_good=names, boot=names, clean=st.booleans())
def test_render_parse_round_trip(
    desired: str | None, last_good: str | None, boot: str | None, *, clean: bool
) -> None:
    s = State(desired_model=desired, last_good_model=last_good, boot_id=boot, clean_shutdown=clean)
    assert parse_state(render_state(s)) == s


@pytest.mark.parametrize(
    "text",
    ["garbage[[", "schema = 9\n", "desired_model = 3\n", "what = 'x'\n", "clean_shutdown='y'\n"],
)
def test_bad_state_raises(text: str) -> None:
    with pytest.raises(StateError):
        parse_state(text)


def test_missing_file_is_a_fresh_state(tmp_path: Path) -> None:
    assert StateStore(tmp_path).load() == (State(), None)


def test_save_then_load(tmp_path: Path) -> None:
    store = StateStore(tmp_path / "sub")
    store.save(State(desired_model="a", boot_id="b"))
    assert store.load() == (State(desired_model="a", boot_id="b"), None)
    assert not [p for p in (tmp_path / "sub").iterdir() if p.name.startswith(".")]


def test_corrupt_file_is_kept_aside_not_deleted(tmp_path: Path) -> None:
    when = dt.datetime(2026, 12, 1, 14, 0, 0, tzinfo=dt.UTC)
    store = StateStore(tmp_path, now=when)
    store.path.write_text("\x00\x01 not toml")
    state, warning = store.load()
    assert state == State()
    aside = tmp_path / "state.toml.corrupt-20261201T140000Z"
    assert aside.read_text() == "\x00\x01 not toml"
    assert warning is not None and str(aside) in warning
    assert not store.path.exists()
    # A second corrupt file in the same second gets its own name.
    store.path.write_text("again[")
    store.load()
    assert (tmp_path / "state.toml.corrupt-20261201T140000Z.1").read_text() == "again["
