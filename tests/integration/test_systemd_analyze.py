"""The rendered engine units against the real systemd parser: `systemd-analyze verify` and
`systemd-analyze security --offline=true`. Neither needs systemd running as PID 1.

`systemd-analyze verify` exits 0 on unknown keys and unparseable values (it only warns), so
these tests fail on any output on stderr. When systemd-analyze is missing they fail with the
reason: they are not skipped.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from sparkd.config import Config, parse_config
from sparkd.units.render import render_unit, render_units

#: The highest `systemd-analyze security` exposure an engine unit may have. Measured on
#: systemd 252 (Debian 12): 1.9 for every engine kind (see docs/units.md); a small margin.
MAX_EXPOSURE = 2.0

MODELS = ("q3.5-30b_fp8", "vllm-throughput", "mistral-7b", "gemma.gguf", "sim-odd")


@dataclass(frozen=True)
class Analysis:
    returncode: int
    stdout: str
    stderr: str


def systemd_analyze() -> str:
    found = shutil.which("systemd-analyze")
    if found is None:
        pytest.fail(
            "systemd-analyze is not installed: these tests check the units against the real "
            "systemd parser (Debian/Ubuntu: apt-get install systemd)"
        )
    return found


def run_analyze(*args: str, cwd: Path | None = None) -> Analysis:
    env = {**os.environ, "SYSTEMD_LOG_COLOR": "0", "SYSTEMD_COLORS": "0", "SYSTEMD_PAGER": ""}
    proc = subprocess.run(
        [systemd_analyze(), *args], capture_output=True, text=True, env=env, cwd=cwd,
        timeout=60, check=False,
    )
    return Analysis(proc.returncode, proc.stdout, proc.stderr)


def systemd_version() -> int:
    out = run_analyze("--version").stdout
    match = re.match(r"systemd (\d+)", out)
    assert match, f"cannot read the version from `systemd-analyze --version`: {out!r}"
    return int(match.group(1))


def verify_problems(unit: Path) -> str:
    """Everything `systemd-analyze verify` had to say about a unit ("" when it is clean)."""
    result = run_analyze("verify", "--man=no", str(unit), cwd=unit.parent)
    if result.returncode == 0 and not result.stderr.strip():
        return ""
    return f"exit status {result.returncode}\n{result.stderr}{result.stdout}"


def exposure(unit: Path) -> float:
    result = run_analyze("security", "--offline=true", "--no-pager", str(unit), cwd=unit.parent)
    assert result.returncode == 0, result.stderr
    assert not result.stderr.strip(), result.stderr
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?) ", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}"
    return float(match.group(1))


def make_executable(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\nexit 0\n")
    path.chmod(0o755)
    return path


def analyze_config(root: Path) -> Config:
    """One model of each engine kind, with executables that exist (verify checks them) and
    the characters that need quoting wherever a value can hold them."""
    odd_sparkd = make_executable(root / "bin dir" / "sparkd 100% $HOME")
    true = shutil.which("true") or "/bin/true"
    toml = f"""
[daemon]
sparkd_path = {_toml(str(odd_sparkd))}
engine_user = "sparkd-engine"

[models."q3.5-30b_fp8"]
engine = "vllm"
binary = {_toml(sys.executable)}
path = "/srv/models/qwen3 30b"
port = 8201
args = ["--speculative-config", '{{"method": "eagle3", "num_speculative_tokens": 3}}',
        "--chat-template", "/srv/templates/a;b.jinja", "--x", "${{HOME}} $$ 100%", ";", ""]
env = {{ HF_HUB_OFFLINE = "1", ODD = "a \\"b\\" \\\\ %n $X\\nline" }}

[models.vllm-throughput]
engine = "vllm"
binary = {_toml(sys.executable)}
path = "/srv/models/gpt-oss"
port = 8202
env = {{ VLLM_FLASHINFER_MOE_BACKEND = "throughput" }}

[models.mistral-7b]
engine = "sglang"
# A Python as binary: SGLang before 0.5.5 runs it with -m sglang.launch_server (from 0.5.5
# sparkd runs the `sglang` script beside it, which this venv does not have).
engine_version = "0.5.4"
binary = {_toml(sys.executable)}
path = "/srv/models/mistral"
port = 8203

[models."gemma.gguf"]
engine = "llamacpp"
binary = {_toml(true)}
path = "/srv/models/gemma 3/model.gguf"
port = 8204
args = ["-ngl", "99"]

[models.sim-odd]
engine = "sim"
path = "/srv/models/sim \\"odd\\" 100% $x \\\\ end"
port = 8101

[models.remote]
engine = "external"
url = "https://api.example.com/v1"
"""
    return parse_config(toml, source=root / "etc dir" / "sparkd 100%.toml")


def _toml(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


@pytest.fixture(scope="module")
def version() -> int:
    return systemd_version()


@pytest.fixture(scope="module")
def units(tmp_path_factory: pytest.TempPathFactory, version: int) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("analyze")
    unit_dir = root / "units"
    unit_dir.mkdir()
    rendered = render_units(analyze_config(root), systemd_version=version)
    assert len(rendered) == len(MODELS)
    paths = {}
    for name, text in rendered.items():
        (unit_dir / name).write_text(text, encoding="utf-8")
        paths[name.removeprefix("sparkd-engine@").removesuffix(".service")] = unit_dir / name
    return paths


def test_systemd_analyze_is_there(version: int) -> None:
    assert version >= 240, f"systemd {version} is older than any supported distribution"


@pytest.mark.parametrize("model", MODELS)
def test_verify_is_silent(units: dict[str, Path], model: str) -> None:
    problems = verify_problems(units[model])
    assert problems == "", f"systemd-analyze verify {units[model].name}:\n{problems}"


@pytest.mark.parametrize("model", MODELS)
def test_security_exposure(units: dict[str, Path], model: str) -> None:
    score = exposure(units[model])
    assert score <= MAX_EXPOSURE, (
        f"{units[model].name}: exposure {score} > {MAX_EXPOSURE}: a hardening setting was "
        "lost (or, if deliberate, raise MAX_EXPOSURE and record why in docs/units.md)"
    )


# --- the checks above can fail: canaries ------------------------------------------------------


def test_verify_reports_an_unknown_key(units: dict[str, Path], tmp_path: Path) -> None:
    bad = tmp_path / "sparkd-engine@canary.service"
    bad.write_text(units["mistral-7b"].read_text() + "NoSuchSettingForSparkd=1\n")
    assert "NoSuchSettingForSparkd" in verify_problems(bad)


def test_restart_steps_known_exactly_from_254(tmp_path: Path, version: int) -> None:
    """Why RestartSteps= is rendered by version: a systemd older than 254 warns about it."""
    config = analyze_config(tmp_path / "r")
    unit = tmp_path / "sparkd-engine@mistral-7b.service"
    unit.write_text(render_unit(config, config.model("mistral-7b"), systemd_version=255))
    problems = verify_problems(unit)
    if version >= 254:
        assert problems == ""
    else:
        assert "RestartSteps" in problems and "RestartMaxDelaySec" in problems


def test_unquoted_executable_would_be_caught(units: dict[str, Path], tmp_path: Path) -> None:
    """The sim unit's executable has a space, % and $ in its path: quoting it is what works."""
    text = units["sim-odd"].read_text()
    (start,) = [line for line in text.split("\n") if line.startswith("ExecStart=")]
    exe = start.removeprefix("ExecStart=").split('" ', 1)[0] + '"'
    assert exe.startswith('"') and " " in exe
    broken = text.replace(start, start.replace(exe, exe.strip('"')))
    bad = tmp_path / "sparkd-engine@sim-odd.service"
    bad.write_text(broken)
    assert "sim-odd" in bad.name and verify_problems(bad) != ""
