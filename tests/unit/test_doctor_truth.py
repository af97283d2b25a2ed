"""`sparkctl doctor` and `sparkd check-config` tell the truth (issue 9's operator review):
the vLLM MoE pin follows the GPU's compute capability, doctor never contradicts itself, a
mistyped pin is an error, the user's own args are checked against the engine's real parser,
and every fix printed works when it is run."""

from __future__ import annotations

import dataclasses
import itertools
import json
import shlex
from pathlib import Path
from typing import Any

import pytest
import status_builders as sb
import tomli_w
from click.testing import CliRunner

from sparkd.config import parse_config
from sparkd.control.client import START_HINT
from sparkd.ctl.doctor import Check, Facts, Level, diagnose
from sparkd.engine.linecheck import check_lines
from sparkd.engine.versions import moe_policy, rules_for
from sparkd.errors import ConfigError
from sparkd.main import cli as sparkd_cli
from sparkd.monitor.nvml import ComputeCapability, FixtureNvml, read_compute_capability
from sparkd.units.render import engine_command

NVML = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"
H200 = read_compute_capability(FixtureNvml(json.loads(
    (NVML / "h200-capability.json").read_text())["captured"]))
GB10 = ComputeCapability((12, 1))  # FACTS.md; no GB10 was at hand to capture from
B200 = ComputeCapability((10, 0))
UNKNOWN = ComputeCapability(None, "NVML is not available: Driver Not Loaded")


def config_text(model: dict[str, Any]) -> str:
    return tomli_w.dumps({"models": {"qwen": {"engine": "vllm", "port": 8201,
                                              "path": "/m/qwen", **model}}})


def facts(model: dict[str, Any], capability: ComputeCapability, **changes: Any) -> Facts:
    config = parse_config(config_text(model), source=Path("/etc/sparkd.toml"))
    base = Facts(config=config, rendered={}, installed={},
                 daemon_status=sb.status(daemon=sb.daemon(status_line="idle")),
                 daemon_error=None, drop_caches_writable=True, mem_total=128 << 30,
                 path_exists={"qwen": True}, capability=capability)
    return dataclasses.replace(base, **changes)


def by_id(checks: list[Check]) -> dict[str, Check]:
    return {c.id: c for c in checks}


# --- the policy -------------------------------------------------------------------------------


def test_the_h200_fixture_is_a_real_capture() -> None:
    assert H200.value == (9, 0) and H200.error is None and str(H200) == "9.0"
    # ... and agrees with the device facts captured on the same machine separately
    device = json.loads((NVML / "h200-device.json").read_text())["devices"][0]
    assert tuple(device["cuda_compute_capability"]) == H200.value


def test_no_nvml_is_an_unknown_capability_with_the_reason() -> None:
    cap = read_compute_capability(FixtureNvml({"init_error": "Driver Not Loaded"}))
    assert cap.value is None and cap.error == "NVML is not available: Driver Not Loaded"
    assert str(cap) == "unknown"


@pytest.mark.parametrize(("version", "capability", "argv_pin", "env_pin"), [
    ("0.34.0", B200, "flashinfer_trtllm", None),   # the latency path runs on 10.x
    ("0.34.0", GB10, "flashinfer_cutlass", None),  # refused there from 0.17: throughput
    ("0.34.0", H200, "flashinfer_cutlass", None),
    ("0.34.0", UNKNOWN, "flashinfer_trtllm", None),  # unknown: the seed's pin
    ("0.23.0", GB10, "flashinfer_cutlass", None),
    ("0.17.0", H200, "flashinfer_cutlass", None),
    ("0.16.0", GB10, None, "latency"),  # before 0.17 nothing is refused: the seed's pin
    ("0.11.2", H200, None, "latency"),
])
def test_sparkds_moe_pin_follows_the_gpu(version: str, capability: ComputeCapability,
                                         argv_pin: str | None, env_pin: str | None) -> None:
    config = parse_config(config_text({"engine_version": version}), source=Path("/c.toml"))
    command = engine_command(config, config.model("qwen"), capability=capability.value)
    argv = command.argv
    assert (argv[argv.index("--moe-backend") + 1] if "--moe-backend" in argv else None) \
        == argv_pin
    assert dict(command.env).get("VLLM_FLASHINFER_MOE_BACKEND") == env_pin
    assert command.moe_from == "sparkd"


@pytest.mark.parametrize("model", [
    {"args": ["--moe-backend", "flashinfer_trtllm"]},
    {"env": {"VLLM_FLASHINFER_MOE_BACKEND": "latency"}},
])
def test_a_users_pin_always_wins(model: dict[str, Any]) -> None:
    config = parse_config(config_text({"engine_version": "0.34.0", **model}),
                          source=Path("/c.toml"))
    command = engine_command(config, config.model("qwen"), capability=GB10.value)
    assert command.moe_backend == "flashinfer_trtllm"
    assert command.argv.count("--moe-backend") == 1


# --- doctor is self-consistent ----------------------------------------------------------------

PINS: list[dict[str, Any]] = [
    {}, {"args": ["--moe-backend", "flashinfer_trtllm"]},
    {"args": ["--moe-backend", "flashinfer_cutlass"]}, {"args": ["--moe-backend", "auto"]},
    {"env": {"VLLM_FLASHINFER_MOE_BACKEND": "latency"}},
    {"env": {"VLLM_FLASHINFER_MOE_BACKEND": "throughput"}},
    {"env": {"VLLM_FLASHINFER_MOE_BACKEND": "masked_gemm"}},
]


@pytest.mark.parametrize(("version", "capability", "pin"), list(itertools.product(
    ["0.11.2", "0.23.0", "0.34.0", None], [B200, GB10, H200, UNKNOWN], PINS)))
def test_doctor_never_contradicts_itself(version: str | None, capability: ComputeCapability,
                                         pin: dict[str, Any]) -> None:
    # detected, not pinned: a pin the release does not take is refused when pinned
    checks = diagnose(facts(pin, capability,
                            engine_versions={"qwen": version} if version else {}))
    text = " ".join(f"{c.message} {c.fix}" for c in checks)
    assert "None" not in text and "froze" not in text
    moe = by_id(checks)["moe_backend.qwen"]
    # "reads" and "not a flag of" / "not a value it takes" never in one message
    if "not a flag" in moe.message or "not a value" in moe.message:
        assert "reads)" not in moe.message, moe.message
    rules = rules_for("vllm", version).rules
    if "remove the pin" in moe.fix:
        # ... never a pin that doctor recommends elsewhere, nor sparkd's own choice here
        pinned = (pin.get("args") or ["", ""])[1] or {
            "latency": "flashinfer_trtllm", "throughput": "flashinfer_cutlass"}.get(
            pin.get("env", {}).get("VLLM_FLASHINFER_MOE_BACKEND", ""), "")
        assert pinned and pinned != moe_policy(rules, capability.value)
        assert all(f"--moe-backend {pinned}" not in c.fix for c in checks)
    refused = (rules.moe_refuses and capability.value is not None
               and capability.value[0] != 10 and "flashinfer_trtllm" in json.dumps(pin) +
               {"latency": "flashinfer_trtllm"}.get(
                   pin.get("env", {}).get("VLLM_FLASHINFER_MOE_BACKEND", ""), ""))
    if refused:
        assert moe.level is Level.FAIL and "refuses it at start" in moe.message
    if capability.value is None and rules.moe_refuses:
        assert "compute capability could not be read" in moe.message


def test_a_pin_the_engine_refuses_here_fails_with_the_fix() -> None:
    """Before: doctor rated a latency pin on a GB10 with vLLM 0.34 as ok."""
    for gpu in (GB10, H200):
        moe = by_id(diagnose(facts({"engine_version": "0.34.0", "args": [
            "--moe-backend", "flashinfer_trtllm"]}, gpu)))["moe_backend.qwen"]
        assert moe.level is Level.FAIL
        assert f"compute capability {gpu}" in moe.message
        assert moe.fix == ("remove the pin from models.qwen.args (sparkd then pins "
                           "--moe-backend flashinfer_cutlass here)")


def test_the_throughput_path_on_sm12x_is_said_ok_and_names_the_watch() -> None:
    """The best this GPU and release allow: said (with the watch that guards the desktop),
    not a warning an operator has no fix for (the second review: every GB10 vLLM 0.17+ MoE
    model warned)."""
    for pin in ({}, {"env": {"VLLM_FLASHINFER_MOE_BACKEND": "throughput"}}):
        moe = by_id(diagnose(facts({"engine_version": "0.34.0", **pin}, GB10)))[
            "moe_backend.qwen"]
        assert moe.level is Level.OK
        assert "latency (TensorRT-LLM) MoE kernels do not run on this GPU" in moe.message
        assert "docs/watch.md" in moe.message and moe.fix == ""


def test_doctor_says_when_the_capability_could_not_be_read() -> None:
    moe = by_id(diagnose(facts({"engine_version": "0.34.0"}, UNKNOWN)))["moe_backend.qwen"]
    assert moe.level is Level.WARN
    assert "compute capability could not be read (NVML is not available" in moe.message
    assert "--moe-backend flashinfer_trtllm" in moe.message


# --- a mistyped pin is not silent -------------------------------------------------------------


def test_a_mistyped_pin_is_an_error_and_nothing_renders_none(tmp_path: Path) -> None:
    """Before: "bogus" on 0.34 rendered the variable (0.34 does not read it) and no flag,
    check-config said OK and doctor printed `--moe-backend None`. Now the config is refused
    (check-config, and sparkd at start or reload: it runs on the accepted copy), naming the
    key, the values that release takes and the fix."""
    cfg = tmp_path / "c.toml"
    for version, takes in (("0.34.0", "latency, throughput, masked_gemm"),
                           ("0.11.2", "latency, throughput")):
        cfg.write_text(config_text({"engine_version": version,
                                    "env": {"VLLM_FLASHINFER_MOE_BACKEND": "bogus"}}))
        res = CliRunner().invoke(sparkd_cli, ["check-config", "--config", str(cfg)])
        assert res.exit_code == 2
        assert res.output == (
            f"{cfg}: models.qwen.env.VLLM_FLASHINFER_MOE_BACKEND: expected a value vLLM "
            f"{version} takes ({takes}), or no key (sparkd then pins the backend for this "
            'GPU), got "bogus"\n')
    # A release that does not take a value others do: refused too.
    cfg.write_text(config_text({"engine_version": "0.11.2",
                                "env": {"VLLM_FLASHINFER_MOE_BACKEND": "masked_gemm"}}))
    res = CliRunner().invoke(sparkd_cli, ["check-config", "--config", str(cfg)])
    assert res.exit_code == 2 and "vLLM 0.11.2 takes (latency, throughput)" in res.output
    # Never a pin of None in what doctor prints: 0.11.2 with a --moe-backend flag (not a flag
    # there; before: "VLLM_FLASHINFER_MOE_BACKEND=None").
    old = diagnose(facts({"engine_version": "0.11.2", "args": [
        "--moe-backend", "flashinfer_cutlass"]}, GB10))
    moe = by_id(old)["moe_backend.qwen"]
    assert moe.level is Level.FAIL and "None" not in moe.message
    assert moe.message.startswith("qwen: MoE pin --moe-backend flashinfer_cutlass")


def test_a_value_the_detected_release_does_not_take_is_an_error() -> None:
    """Not pinned: the config cannot know the release; check-config checks it against the
    detected one."""
    config = parse_config(config_text({"env": {"VLLM_FLASHINFER_MOE_BACKEND": "masked_gemm"}}),
                          source=Path("/c.toml"))
    report = check_lines(config, {"qwen": "0.11.2"})
    assert report.errors == [
        '/c.toml: models.qwen.env.VLLM_FLASHINFER_MOE_BACKEND: "masked_gemm" is not a value '
        "vLLM 0.11.2 takes (it takes: throughput, latency); fix: set one of them, or remove "
        "the key (sparkd then pins the MoE backend for this GPU)"]
    # ... and doctor, told the detected release, fails the pin without a "None".
    moe = by_id(diagnose(facts({"env": {"VLLM_FLASHINFER_MOE_BACKEND": "masked_gemm"}}, GB10,
                               engine_versions={"qwen": "0.11.2"})))["moe_backend.qwen"]
    assert moe.level is Level.FAIL and "None" not in moe.message


# --- the user's own args against the real parsers ---------------------------------------------


@pytest.mark.parametrize(("model", "error"), [
    ({"engine_version": "0.11.2", "args": ["--moe-backend", "flashinfer_cutlass"]},
     "models.qwen.args: --moe-backend: not a flag of vllm 0.11.2; fix: vLLM 0.11.2 reads the "
     "MoE pin from a variable, not a flag: remove it from args and set env = { "
     'VLLM_FLASHINFER_MOE_BACKEND = "throughput" } in models.qwen'),
    ({"engine_version": "0.34.0", "args": ["--max-model-len", "lots"]},
     "models.qwen.args: --max-model-len 'lots': not a value of type"),
    ({"engine_version": "0.26.0", "args": ["--moe-backend", "rdna3"]},
     "models.qwen.args: --moe-backend 'rdna3': not one of the choices"),
    ({"engine_version": "0.34.0", "env": {"VLLM_FLASHINFER_MOE_BACKEND_X": "1"}},
     "models.qwen.env.VLLM_FLASHINFER_MOE_BACKEND_X: not a variable vllm 0.34.0 reads; fix: "
     "remove it from models.qwen.env"),
    ({"engine": "llamacpp", "engine_version": "b11434", "args": ["--draft-max", "4"]},
     "models.qwen.args: --draft-max: removed in llamacpp 11434; fix: use --spec-draft-n-max "
     "instead"),
    ({"engine": "llamacpp", "engine_version": "11434", "args": ["--no-such-flag"]},
     "models.qwen.args: --no-such-flag: not a flag of llamacpp 11434; fix: remove it from "
     "models.qwen.args"),
    ({"engine": "sglang", "engine_version": "0.5.23", "args": ["--mem-fraction-static", "hi"]},
     "models.qwen.args: --mem-fraction-static 'hi': not a value of type float"),
])
def test_check_config_checks_the_users_args_against_the_parser(
        tmp_path: Path, model: dict[str, Any], error: str) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text(model))
    res = CliRunner().invoke(sparkd_cli, ["check-config", "--config", str(cfg)])
    assert res.exit_code == 2, res.output
    assert f"{cfg}: {error}" in res.output


def test_a_release_outside_the_table_is_a_warning_not_an_error(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text({"engine_version": "9.9.9", "args": ["--anything"]}))
    res = CliRunner().invoke(sparkd_cli, ["check-config", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "warning: " in res.output and "9.9.9 is newer than the newest release" in res.output
    cfg.write_text(config_text({"engine_version": "0.20.2", "args": ["--anything"]}))
    res = CliRunner().invoke(sparkd_cli, ["check-config", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    assert "no parser of vllm 0.20.2 is recorded" in res.output


# --- doctor's fixes ---------------------------------------------------------------------------


def test_the_version_fix_gives_the_engines_own_form() -> None:
    """Before: engine_version = "X.Y.Z" for every engine, llama.cpp's builds included."""
    for engine, form in (("vllm", '"0.34.0"'), ("llamacpp", '"b11434"')):
        check = by_id(diagnose(facts({"engine": engine}, GB10)))["engine_version.qwen"]
        assert check.level is Level.WARN
        assert "X.Y.Z" not in check.fix and form in check.fix
        assert check.message.count("rendered with the rules") == 1


def test_a_release_outside_the_table_is_not_rated_ok() -> None:
    checks = by_id(diagnose(facts({"engine_version": "9.9.9"}, B200)))
    assert checks["engine_version.qwen"].level is Level.WARN
    assert checks["engine_version.qwen"].message.count("rendered with the rules") == 1
    assert "what vLLM 9.9.9 reads" not in checks["moe_backend.qwen"].message
    assert "vLLM 0.24.0+ (the rules used)" in checks["moe_backend.qwen"].message


def test_no_pull_without_a_source_and_no_reload_without_a_daemon() -> None:
    checks = by_id(diagnose(facts({}, GB10, path_exists={"qwen": False}, daemon_status=None,
                                  daemon_error=f"sparkd is not running (no control socket at "
                                  f"/run/sparkd/control.sock); why: journalctl -u sparkd -n "
                                  f"20; start it: {START_HINT}", rendered={"a": "x"},
                                  installed={"a": None}, file_refused="bad key")))
    assert not checks["weights.qwen"].fix.startswith("sparkctl pull")
    assert "models.qwen.source" in checks["weights.qwen"].fix
    assert "reload" not in checks["units"].fix and START_HINT in checks["units"].fix
    assert "reload" not in checks["config_file"].fix
    daemon = checks["daemon"]
    assert (daemon.message + daemon.fix).count(START_HINT) == 1


def _run_fix(fix: str) -> tuple[int, str]:
    """Run the `sparkd ...` command a fix names."""
    words = shlex.split(fix.split(";")[0])
    assert words[0] == "sparkd", fix
    res = CliRunner().invoke(sparkd_cli, words[1:])
    return res.exit_code, res.output


def test_the_printed_fixes_work_when_run(tmp_path: Path) -> None:
    """The fixes doctor prints, applied or run: the engine_version it names is accepted,
    removing a refused pin makes doctor pass, and the check-config it names runs and says
    what is wrong."""
    from sparkd.engine.linecheck import version_hint

    cfg = tmp_path / "c.toml"
    # The detected release, as the version fix names it: applied, the config is accepted.
    for engine, detected in (("vllm", "0.34.0+cu130"), ("llamacpp", "11434"),
                             ("sglang", "0.5.23")):
        config = parse_config(config_text({"engine": engine}), source=cfg)
        hint = version_hint(config.model("qwen"), detected)
        assert hint.startswith(f'engine_version = "{detected}" in models.qwen')
        cfg.write_text(config_text({"engine": engine, "engine_version": hint.split('"')[1]}))
        assert _run_fix(f"sparkd check-config --config {cfg}") == (0, f"{cfg}: OK (qwen)\n")
    # A refused pin: the fix (remove it) applied, doctor no longer fails.
    pinned = {"engine_version": "0.34.0", "args": ["--moe-backend", "flashinfer_trtllm"]}
    moe = by_id(diagnose(facts(pinned, GB10)))["moe_backend.qwen"]
    assert moe.level is Level.FAIL and moe.fix.startswith("remove the pin from models.qwen.args")
    fixed = by_id(diagnose(facts({"engine_version": "0.34.0"}, GB10)))
    assert all(c.level is not Level.FAIL for c in fixed.values()), fixed
    # A pin the release cannot read: the fix is a check-config command that runs and names
    # the problem.
    bad = {"engine_version": "0.11.2", "args": ["--moe-backend", "flashinfer_cutlass"]}
    cfg.write_text(config_text(bad))
    f = facts(bad, GB10)
    f = dataclasses.replace(f, config=dataclasses.replace(f.config, source=cfg))
    fixes = [c.fix for c in diagnose(f) if c.fix.startswith("sparkd ")]
    assert fixes
    for fix in fixes:
        code, out = _run_fix(fix)
        assert code == 2 and "--moe-backend: not a flag of vllm 0.11.2" in out, fix
    # A release outside the table: the command the fix names runs and shows the line.
    from sparkd.ctl.main import cli as sparkctl_cli

    cfg.write_text(config_text({"engine_version": "9.9.9"}))
    f = facts({"engine_version": "9.9.9"}, GB10)
    f = dataclasses.replace(f, config=dataclasses.replace(f.config, source=cfg))
    fix = by_id(diagnose(f))["engine_version.qwen"].fix
    command = shlex.split(fix.rsplit(": ", 1)[1])
    assert command[:2] == ["sparkctl", "units"]
    res = CliRunner().invoke(sparkctl_cli, command[1:])
    assert res.exit_code == 0 and "ExecStart=vllm serve /m/qwen" in res.output


# --- engine_version in the config -------------------------------------------------------------


@pytest.mark.parametrize(("engine", "version"), [
    ("vllm", "0.34.0+cu130"), ("vllm", "0.11.2rc1"), ("sglang", "0.5.23.post1"),
    ("llamacpp", "b11434"), ("llamacpp", "11434"),
])
def test_engine_version_forms_accepted(engine: str, version: str) -> None:
    config = parse_config(config_text({"engine": engine, "engine_version": version}),
                          source=Path("/c.toml"))
    assert config.model("qwen").engine_version == version


@pytest.mark.parametrize(("engine", "version", "expected"), [
    ("vllm", "b11434", 'a vLLM release as pip shows it, such as "0.34.0"'),
    ("sglang", "11434x", 'an SGLang release as pip shows it'),
    ("llamacpp", "0.34", 'a llama.cpp build number, such as "b11434" or "11434"'),
    ("llamacpp", "0.34.0", "a llama.cpp build number"),
])
def test_engine_version_of_another_engines_form_is_refused(engine: str, version: str,
                                                           expected: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(config_text({"engine": engine, "engine_version": version}),
                     source=Path("/c.toml"))
    assert err.value.message.startswith(f"/c.toml: models.qwen.engine_version: expected "
                                        f"{expected}")
    assert err.value.message.endswith(f'got "{version}"')


def test_engine_version_errors_escape_control_characters() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config(config_text({"engine_version": "0.34.0\x1b[2J\n"}), source=Path("/c.toml"))
    assert err.value.message.endswith('got "0.34.0\\x1b[2J\\x0a"')
    assert "\x1b" not in err.value.message and "\n" not in err.value.message


# --- llama.cpp speculation: the config takes what docs/units.md and the real server do --------


def test_a_llamacpp_speculative_variant_is_accepted_and_checked(tmp_path: Path) -> None:
    """b11434's llama-server starts with the draft flags sparkd renders
    (tests/integration/test_llama_server.py); before, the config refused the table."""
    cfg = tmp_path / "c.toml"
    spec = {"method": "eagle3", "draft_model": "/m/draft.gguf", "num_speculative_tokens": 4}
    cfg.write_text(config_text({"engine": "llamacpp", "engine_version": "b11434",
                                "speculative": spec}))
    res = CliRunner().invoke(sparkd_cli, ["check-config", "--config", str(cfg)])
    assert res.exit_code == 0, res.output
    config = parse_config(cfg.read_text(), source=cfg)
    argv = engine_command(config, config.model("qwen"), "speculative").argv
    assert argv[-6:] == ["--spec-draft-model", "/m/draft.gguf", "--spec-draft-n-max", "4",
                         "--spec-type", "draft-eagle3"]
    # A method llama.cpp does not have: check-config says so, naming the key.
    cfg.write_text(config_text({"engine": "llamacpp", "engine_version": "b11434",
                                "speculative": {**spec, "method": "eagle"}}))
    res = CliRunner().invoke(sparkd_cli, ["check-config", "--config", str(cfg)])
    assert res.exit_code == 2
    assert f'{cfg}: models.qwen.speculative.method: expected "eagle3" (llama.cpp speculates ' \
        'with EAGLE3 only: common/speculative.cpp), got "eagle"' in res.output


def test_sparkctl_doctor_shows_what_the_parsers_refuse(tmp_path: Path) -> None:
    """Before: doctor said nothing of a removed llama.cpp flag in a model's args."""
    from sparkd.ctl.main import cli as sparkctl_cli

    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\ncontrol_socket = "{tmp_path}/none.sock"\n'
                   f'unit_dir = "{tmp_path}/units"\n'
                   + config_text({"engine": "llamacpp", "engine_version": "b11434",
                                  "args": ["--draft-max", "4"]}))
    res = CliRunner().invoke(sparkctl_cli, ["doctor", "--config", str(cfg)])
    assert res.exit_code == 1
    assert ("FAIL  the engines' real parsers refuse: models.qwen.args: --draft-max: removed in "
            "llamacpp 11434; fix: use --spec-draft-n-max instead") in res.output
    assert f"fix: sparkd check-config --config {cfg}" in res.output


def test_the_fallback_line_of_vllm_0_12_to_0_16_is_fingerprinted() -> None:
    """vllm 0.12.0-0.16.0 quantization/utils/flashinfer_utils.py, the latency variable on a
    GPU that is not 10.x: no backend chosen from it (the pin falls back by itself there)."""
    from sparkd.engine.fingerprints import chosen_moe_backend, match_lines

    line = ("INFO 12-03 10:00:00 [flashinfer_utils.py:291] Flashinfer TRTLLM MOE backend is "
            "only supported on SM100 and later, using CUTLASS backend instead")
    found = match_lines([line], engine="vllm")
    assert [m.fingerprint.id for m in found] == ["moe_latency_fallback"]
    assert chosen_moe_backend(found) is None


def test_doctor_says_a_pin_the_detected_release_refuses_once() -> None:
    """The parsers' check (engine_lines) says it, with the check-config command; no third
    check repeats it."""
    f = facts({"env": {"VLLM_FLASHINFER_MOE_BACKEND": "masked_gemm"}}, GB10,
              engine_versions={"qwen": "0.11.2"},
              line_errors=['/etc/sparkd.toml: models.qwen.env.VLLM_FLASHINFER_MOE_BACKEND: '
                           '"masked_gemm" is not a value vLLM 0.11.2 takes'])
    checks = by_id(diagnose(f))
    assert checks["engine_lines"].level is Level.FAIL
    assert checks["engine_lines"].fix == "sparkd check-config --config /etc/sparkd.toml"
    assert "engine_line.qwen" not in checks


@pytest.mark.parametrize(("version", "lines"), [
    ("0.11.2", ["WARNING Non-gated MoE is not supported for min-latency mode,falling back to "
                "high-throughput mode", "INFO Using FlashInfer CUTLASS kernels"]),
    ("0.11.2", ["INFO Using FlashInfer FP8 MoE CUTLASS backend for SM90/SM100"]),
    ("0.16.0", ["WARNING Flashinfer TRTLLM MOE backend is only supported on SM100 and later, "
                "using CUTLASS backend instead",
                "INFO Using 'FLASHINFER_CUTLASS' NvFp4 MoE backend out of potential backends"]),
])
def test_a_release_before_0_17_falling_back_from_sparkds_pin_is_not_a_failure(
        version: str, lines: list[str]) -> None:
    """moe_backend says a release before 0.17 falls back to CUTLASS by itself where the
    latency kernels do not run; before, moe_chosen then failed that very fallback ("the pin
    asks for flashinfer_trtllm, the engine chose flashinfer_cutlass")."""
    from sparkd.daemon.report import fingerprint_record
    from sparkd.engine.fingerprints import match_lines

    prints = tuple(fingerprint_record(m) for m in match_lines(lines, engine="vllm"))
    status = sb.status(daemon=sb.daemon(status_line="idle"), engines=(
        sb.engine("qwen", 8201, engine="vllm", fingerprints=prints),))
    for gpu in (H200, GB10):
        checks = by_id(diagnose(facts({"engine_version": version}, gpu,
                                      daemon_status=status)))
        assert checks["moe_backend.qwen"].level is Level.OK
        chosen = checks["moe_chosen.qwen"]
        assert chosen.level is Level.OK, chosen
        assert "fell back to it from the latency pin by itself" in chosen.message
    # On a GPU that runs the latency kernels the same log is still a failure.
    on_b200 = by_id(diagnose(facts({"engine_version": version}, ComputeCapability((10, 0)),
                                   daemon_status=status)))["moe_chosen.qwen"]
    if not any("falling back" in line or "instead" in line for line in lines):
        assert on_b200.level is Level.FAIL
