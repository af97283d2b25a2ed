"""Bash completion of model names (sparkd/ctl/complete.py), through click's own completion
machinery as the packaged bash script drives it: COMP_WORDS/COMP_CWORD in, `type,value` out."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.shell_completion import BashComplete

from sparkd.ctl.complete import model_names
from sparkd.ctl.main import cli

CONFIG = """
[daemon]
default_model = "small"

[models.small]
engine = "sim"
port = 8101

[models.large]
engine = "sim"
port = 8102
memory_gb = 3  # a typo sparkd refuses: completion still offers the names
"""


def complete(words: str) -> list[str]:
    """What the packaged script gets back for the command line `words` (cursor at the end)."""
    args = words.split()[1:]
    incomplete = "" if words.endswith(" ") else args.pop()
    comp = BashComplete(cli, {}, "sparkctl", "_SPARKCTL_COMPLETE")
    return [item.value for item in comp.get_completions(args, incomplete)]


@pytest.fixture
def config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "sparkd.toml"
    path.write_text(CONFIG)
    monkeypatch.setenv("SPARKD_CONFIG", str(path))
    return path


def test_model_names_are_the_models_tables(config: Path) -> None:
    assert model_names(config) == ["large", "small"]


@pytest.mark.parametrize("text", ["", "[models\n", "models = 3\n", "[models]\nx = 1\n"])
def test_a_missing_or_broken_file_completes_nothing(tmp_path: Path, text: str) -> None:
    path = tmp_path / "sparkd.toml"
    if text:
        path.write_text(text)
    assert model_names(path) == []


def test_swap_pull_verify_and_logs_complete_model_names(config: Path) -> None:
    assert complete("sparkctl swap ") == ["large", "small"]
    assert complete("sparkctl swap s") == ["small"]
    assert complete("sparkctl pull l") == ["large"]
    assert complete("sparkctl verify --full ") == ["large", "small"]
    assert complete("sparkctl logs --model sm") == ["small"]


def test_an_explicit_config_wins(config: Path, tmp_path: Path) -> None:
    other = tmp_path / "other.toml"
    other.write_text('[models.only]\nengine = "sim"\nport = 8101\n')
    assert complete(f"sparkctl swap --config {other} ") == ["only"]
