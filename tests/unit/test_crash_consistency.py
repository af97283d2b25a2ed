"""Crash consistency of sparkd's durable writes (issue 12), checked the way ALICE and
CrashMonkey do: record the file operations that `StateStore.save` and `save_accepted` perform
(through sparkd.atomic's `os`, replaced by tests/unit/crashfs.py's recorder), then build every
directory a power loss can leave after each prefix of them, under the file system model that
crashfs.py states and cites (unsynced data may be lost, torn or kept, in no order against the
directory operations; those persist in order up to the last directory fsync), and read it
back with sparkd's own reader. Each must give the old value or the new one, and the new one
once the write function has returned.

A container's power cut (tests/system/test_write_cuts.py) cannot lose the page cache; this
is the part it cannot try. The checker is shown to catch broken variants of the sequence (the
rename before the fsync, no fsync, no directory fsync, a write in place).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from crashfs import CrashState, RecordingOs, crash_states

import sparkd.atomic
from sparkd.accepted import save_accepted
from sparkd.config import load_config, parse_config
from sparkd.errors import ConfigError
from sparkd.state import State, StateStore, render_state

OLD = State(desired_model="a", last_good_model="a", boot_id="b1", last_swap_id=7)
NEW = State(desired_model="b", last_good_model="a", boot_id="b1", last_swap_id=8,
            swap_to="b", swap_from="a", swap_step="start")
Variant = Callable[[RecordingOs, Path, bytes], None]


def record(monkeypatch: pytest.MonkeyPatch, directory: Path, initial: dict[str, bytes],
           write: Callable[[], object]) -> RecordingOs:
    fs = RecordingOs(str(directory), initial)
    with monkeypatch.context() as m:
        m.setattr(sparkd.atomic, "os", fs)
        write()
    fs.returned()
    return fs


def build(root: Path, directory: Path, state: CrashState, n: int) -> Path:
    """The crash state as a real directory (so that sparkd's own reader reads it)."""
    target = root / f"crash-{n}"
    target.mkdir()
    for name, data in state.files.items():
        (target / Path(name).relative_to(directory)).write_bytes(data)
    return target


def judge_state(root: Path, directory: Path, initial: dict[str, bytes],
                ops_fs: RecordingOs, old: State) -> tuple[list[str], dict[str, int]]:
    """Failures, and how many crash states gave the old and the new value."""
    failures: list[str] = []
    seen = {"old": 0, "new": 0}
    for n, crash in enumerate(crash_states(initial, ops_fs.ops)):
        target = build(root, directory, crash, n)
        got, warning = StateStore(target).load()
        if warning is not None:
            failures.append(f"{crash.how}: the reader set the state aside: {warning}")
        elif got == NEW:
            seen["new"] += 1
        elif got == old and not crash.after_return:
            seen["old"] += 1
        else:
            failures.append(f"{crash.how}: the reader got {got} "
                            f"{'after the write returned' if crash.after_return else ''}")
    return failures, seen


@pytest.mark.parametrize("before", ["a state", "no state"])
def test_every_crash_state_of_a_state_write_reads_old_or_new(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, before: str,
) -> None:
    first_write = before == "no state"
    directory = tmp_path / "state"
    directory.mkdir()
    path = str(directory / "state.toml")
    initial = {} if first_write else {path: render_state(OLD).encode()}
    fs = record(monkeypatch, directory, initial, lambda: StateStore(directory).save(NEW))
    assert [op.kind for op in fs.ops] == [
        "create", "write", "fsync", "rename", "fsync_dir", "returned"]
    assert not any(directory.iterdir())  # the recorder wrote nothing real
    crashes = tmp_path / "crashes"
    crashes.mkdir()
    failures, seen = judge_state(crashes, directory, initial, fs,
                                 State() if first_write else OLD)
    assert failures == []
    # Both outcomes happen: the check is not vacuous.
    assert seen["old"] > 0 and seen["new"] > 0, seen


def config_text(tag: str, state_dir: Path) -> str:
    return (f'# {tag}\n[daemon]\ndefault_model = "{tag}"\nstate_dir = "{state_dir}"\n\n'
            f'[models.{tag}]\nengine = "sim"\nport = 8101\n')


def test_every_crash_state_of_an_accepted_config_write_is_one_whole_config(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
) -> None:
    directory = tmp_path / "state"
    directory.mkdir()
    old_text, new_text = config_text("a", directory), config_text("b", directory)
    path = directory / "accepted.toml"
    config = parse_config(new_text, source=tmp_path / "sparkd.toml")
    assert config.daemon.accepted_config == path
    fs = record(monkeypatch, directory, {str(path): old_text.encode()},
                lambda: save_accepted(config))
    crashes = tmp_path / "crashes"
    crashes.mkdir()
    failures, seen = [], {"old": 0, "new": 0}
    for n, crash in enumerate(crash_states({str(path): old_text.encode()}, fs.ops)):
        copy = build(crashes, directory, crash, n) / "accepted.toml"
        try:
            loaded = load_config(copy)
        except ConfigError as exc:
            failures.append(f"{crash.how}: the copy does not load: {exc.message}")
            continue
        if loaded.text == new_text:
            seen["new"] += 1
        elif loaded.text == old_text and not crash.after_return:
            seen["old"] += 1
        else:
            failures.append(f"{crash.how}: the copy is {loaded.text!r}")
    assert failures == []
    assert seen["old"] > 0 and seen["new"] > 0, seen


# Broken variants of sparkd.atomic.atomic_write, each one change away from it, on the
# recorder: the checker must find a crash state that reads neither value (or the old one after
# the function returned).

def _dir_fsync(os_: RecordingOs, directory: Path) -> None:
    dfd = os_.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    os_.fsync(dfd)
    os_.close(dfd)


def rename_before_fsync(os_: RecordingOs, path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    with os_.fdopen(os_.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as f:
        f.write(data)
        os_.replace(tmp, path)  # before the data is durable
        os_.fsync(f.fileno())
    _dir_fsync(os_, path.parent)


def no_fsync(os_: RecordingOs, path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    with os_.fdopen(os_.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as f:
        f.write(data)
    os_.replace(tmp, path)
    _dir_fsync(os_, path.parent)


def no_dir_fsync(os_: RecordingOs, path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    with os_.fdopen(os_.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as f:
        f.write(data)
        os_.fsync(f.fileno())
    os_.replace(tmp, path)  # returns with the rename not yet durable


def in_place(os_: RecordingOs, path: Path, data: bytes) -> None:
    with os_.fdopen(os_.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as f:
        f.write(data)
        os_.fsync(f.fileno())
    _dir_fsync(os_, path.parent)


def the_correct_sequence(os_: RecordingOs, path: Path, data: bytes) -> None:
    tmp = path.parent / f".{path.name}.tmp"
    with os_.fdopen(os_.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), "wb") as f:
        f.write(data)
        os_.fsync(f.fileno())
    os_.replace(tmp, path)
    _dir_fsync(os_, path.parent)


def judge_variant(tmp_path: Path, variant: Variant) -> list[str]:
    directory = tmp_path / "state"
    directory.mkdir()
    path = directory / "state.toml"
    initial = {str(path): render_state(OLD).encode()}
    fs = RecordingOs(str(directory), initial)
    variant(fs, path, render_state(NEW).encode())
    fs.returned()
    crashes = tmp_path / "crashes"
    crashes.mkdir()
    return judge_state(crashes, directory, initial, fs, OLD)[0]


@pytest.mark.parametrize("variant", [rename_before_fsync, no_fsync, no_dir_fsync, in_place])
def test_the_checker_catches_a_broken_write_sequence(tmp_path: Path, variant: Variant) -> None:
    failures = judge_variant(tmp_path, variant)
    assert failures, f"{variant.__name__}: no crash state caught"


def test_the_same_variants_written_correctly_pass(tmp_path: Path) -> None:
    # The control for the test above: the variants fail for their one change, not for how
    # they are written.
    assert judge_variant(tmp_path, the_correct_sequence) == []
