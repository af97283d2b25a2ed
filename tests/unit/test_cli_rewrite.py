"""`sparkctl rewrite --model NAME FILE`: what a request becomes, without a daemon."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner

from sparkd.ctl.exits import ExitStatus
from sparkd.ctl.main import cli

CONFIG = """
[models.mistral]
engine = "vllm"
port = 8001
source = "mistralai/Mistral-7B-Instruct-v0.1"
role_policy = "auto"
"""


def test_shows_the_rewritten_request_and_the_roles(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(CONFIG)
    request = {"model": "mistral", "temperature": 0.2, "messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "title?"},
        {"role": "user", "content": "fix it"}]}
    (tmp_path / "r.json").write_text(json.dumps(request))
    result = CliRunner().invoke(cli, ["rewrite", "--config", str(tmp_path / "c.toml"),
                                      "--model", "mistral", str(tmp_path / "r.json")])
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["temperature"] == 0.2
    assert out["messages"] == [{"role": "user", "content": "be brief\n\ntitle?\n\nfix it"}]
    assert "policy auto -> strict" in result.stderr
    assert "roles before: system user user" in result.stderr
    assert "roles after:  user" in result.stderr


def test_unknown_model_and_bad_file(tmp_path: Path) -> None:
    (tmp_path / "c.toml").write_text(CONFIG)
    (tmp_path / "r.json").write_text("{nope")
    args = ["rewrite", "--config", str(tmp_path / "c.toml")]
    r = CliRunner().invoke(cli, [*args, "--model", "qwen", str(tmp_path / "r.json")])
    assert r.exit_code == ExitStatus.UNKNOWN_MODEL
    r = CliRunner().invoke(cli, [*args, "--model", "mistral", str(tmp_path / "r.json")])
    assert r.exit_code == ExitStatus.FAILURE and "not JSON" in r.stderr
    r = CliRunner().invoke(cli, [*args, "--model", "mistral", "-"], input='[{"role": "user"}]')
    assert r.exit_code == 0 and json.loads(r.stdout) == [{"role": "user"}]
