"""Reconciling rendered units into a unit directory (tmp_path based) and the pure plan."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from sparkd.config import Config, parse_config
from sparkd.units.reconcile import ReconcilePlan, plan_reconcile, reconcile
from sparkd.units.render import GENERATED_MARKER, render_units

TOML = """
[models.alpha]
engine = "sim"
port = 8101
args = ["--load-seconds", "1"]

[models.beta]
engine = "vllm"
port = 8102

[models.gamma]
engine = "llamacpp"
path = "/srv/models/gamma.gguf"
port = 8103
"""

A, B, G = (f"sparkd-engine@{n}.service" for n in ("alpha", "beta", "gamma"))
HAND_WRITTEN = "[Service]\nExecStart=/usr/bin/true\n"


def config(toml: str = TOML) -> Config:
    return parse_config(toml, source=Path("/etc/sparkd.toml"))


def desired(toml: str = TOML) -> dict[str, str]:
    return render_units(config(toml), systemd_version=252)


class Reloads:
    def __init__(self) -> None:
        self.count = 0

    def __call__(self) -> None:
        self.count += 1


def listing(unit_dir: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(unit_dir.iterdir()) if p.is_file()}


def test_first_run_writes_everything_and_reloads_once(tmp_path: Path) -> None:
    unit_dir = tmp_path / "run" / "systemd" / "system"  # created when missing
    reload = Reloads()
    want = desired()
    result = reconcile(unit_dir, want, reload=reload)
    assert result.written == (A, B, G)
    assert result.unchanged == result.removed == result.foreign == ()
    assert result.changed
    assert reload.count == 1
    assert listing(unit_dir) == want
    for name in want:
        assert stat.S_IMODE((unit_dir / name).stat().st_mode) == 0o644


def test_second_run_is_a_no_op(tmp_path: Path) -> None:
    reconcile(tmp_path, desired(), reload=Reloads())
    mtimes = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    reload = Reloads()
    result = reconcile(tmp_path, desired(), reload=reload)
    assert result.written == result.removed == ()
    assert result.unchanged == (A, B, G)
    assert not result.changed
    assert reload.count == 0
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == mtimes


def test_changing_one_model_rewrites_only_its_unit(tmp_path: Path) -> None:
    reconcile(tmp_path, desired(), reload=Reloads())
    inode_a = (tmp_path / A).stat().st_ino
    changed = TOML.replace("port = 8102", "port = 8202")
    reload = Reloads()
    result = reconcile(tmp_path, desired(changed), reload=reload)
    assert result.written == (B,)
    assert result.unchanged == (A, G)
    assert reload.count == 1
    assert "--port 8202" in (tmp_path / B).read_text()
    assert (tmp_path / A).stat().st_ino == inode_a  # untouched, not rewritten
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporaries left


def test_removing_one_model_removes_its_unit(tmp_path: Path) -> None:
    reconcile(tmp_path, desired(), reload=Reloads())
    without_gamma = TOML.split("[models.gamma]")[0]
    reload = Reloads()
    result = reconcile(tmp_path, desired(without_gamma), reload=reload)
    assert result.removed == (G,)
    assert result.written == ()
    assert reload.count == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [A, B]


def test_foreign_files_are_never_touched(tmp_path: Path) -> None:
    hand = tmp_path / "sparkd-engine@handmade.service"  # our pattern, no marker
    hand.write_text(HAND_WRITTEN)
    clash = tmp_path / B  # a hand-written file where sparkd wants to write
    clash.write_text(HAND_WRITTEN)
    other = tmp_path / "other.service"
    other.write_text(f"{GENERATED_MARKER}\n[Service]\n")  # marker but not our pattern
    dropins = tmp_path / "sparkd-engine@alpha.service.d"
    dropins.mkdir()
    (dropins / "override.conf").write_text("[Service]\nCPUWeight=20\n")
    mask = tmp_path / "sparkd-engine@masked.service"
    mask.symlink_to("/dev/null")
    weird = tmp_path / "sparkd-engine@dir.service"
    weird.mkdir()

    reload = Reloads()
    result = reconcile(tmp_path, desired(), reload=reload)
    assert result.written == (A, G)
    assert result.foreign == (
        B,
        "sparkd-engine@dir.service",
        "sparkd-engine@handmade.service",
        "sparkd-engine@masked.service",
    )
    assert reload.count == 1
    assert hand.read_text() == HAND_WRITTEN
    assert clash.read_text() == HAND_WRITTEN
    assert other.read_text().startswith(GENERATED_MARKER)
    assert (dropins / "override.conf").exists()
    assert mask.is_symlink() and os.readlink(mask) == "/dev/null"
    assert weird.is_dir()

    # Nothing desired at all: only sparkd's own files go.
    result = reconcile(tmp_path, {}, reload=reload)
    assert result.removed == (A, G)
    assert hand.exists() and clash.exists() and other.exists() and mask.is_symlink()
    assert reload.count == 2


def test_stale_temporaries_from_a_crash_are_cleaned(tmp_path: Path) -> None:
    stale = tmp_path / f".{A}.abc123.sparkd-tmp"
    stale.write_text("half a unit")
    reconcile(tmp_path, desired(), reload=Reloads())
    assert not stale.exists()


def test_a_failing_reload_propagates_with_files_in_place(tmp_path: Path) -> None:
    def broken() -> None:
        raise RuntimeError("daemon-reload failed")

    with pytest.raises(RuntimeError, match="daemon-reload"):
        reconcile(tmp_path, desired(), reload=broken)
    assert sorted(p.name for p in tmp_path.iterdir()) == [A, B, G]


def test_desired_must_be_generated_units(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="marker"):
        reconcile(tmp_path, {A: HAND_WRITTEN}, reload=Reloads())
    with pytest.raises(ValueError, match="name"):
        reconcile(tmp_path, {"evil.service": f"{GENERATED_MARKER}\n"}, reload=Reloads())
    with pytest.raises(ValueError, match="name"):
        plan_reconcile({}, {f"../{A}": f"{GENERATED_MARKER}\n"})
    assert list(tmp_path.iterdir()) == []


# --- the pure plan ------------------------------------------------------------------------

OURS = f"{GENERATED_MARKER}\n[Service]\nExecStart=/bin/true\n"
OURS2 = f"{GENERATED_MARKER}\n[Service]\nExecStart=/bin/false\n"


def test_plan_sorts_every_case() -> None:
    existing = {
        "sparkd-engine@same.service": OURS,
        "sparkd-engine@old.service": OURS,
        "sparkd-engine@diff.service": OURS,
        "sparkd-engine@hand.service": HAND_WRITTEN,
        "sparkd-engine@link.service": None,
        "unrelated.service": OURS,
    }
    want = {
        "sparkd-engine@same.service": OURS,
        "sparkd-engine@diff.service": OURS2,
        "sparkd-engine@new.service": OURS,
        "sparkd-engine@hand.service": OURS,
    }
    plan = plan_reconcile(existing, want)
    assert plan == ReconcilePlan(
        write=("sparkd-engine@diff.service", "sparkd-engine@new.service"),
        unchanged=("sparkd-engine@same.service",),
        remove=("sparkd-engine@old.service",),
        foreign=("sparkd-engine@hand.service", "sparkd-engine@link.service"),
    )
    assert plan.changed


def test_plan_of_nothing_changes_nothing() -> None:
    plan = plan_reconcile({"sparkd-engine@a.service": OURS}, {"sparkd-engine@a.service": OURS})
    assert not plan.changed
    assert not plan_reconcile({}, {}).changed


def test_marker_must_be_a_whole_line() -> None:
    quoted = f"[Service]\nEnvironment=X={GENERATED_MARKER}\n"
    plan = plan_reconcile({"sparkd-engine@a.service": quoted}, {})
    assert plan.foreign == ("sparkd-engine@a.service",)
    assert plan.remove == ()
