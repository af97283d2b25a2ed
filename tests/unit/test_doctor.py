from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import status_builders as sb
from click.testing import CliRunner

from sparkd.config import parse_config
from sparkd.control.status import Status
from sparkd.ctl.doctor import Facts, Level, diagnose
from sparkd.ctl.main import cli
from sparkd.daemon.report import fingerprint_record, gpus_record
from sparkd.engine.fingerprints import match_lines
from sparkd.monitor.nvml import ComputeCapability, FixtureNvml, read, read_compute_capability

CONFIG = """
[daemon]
memory_reserve_gib = 4
[models.qwen]
engine = "vllm"
port = 8201
memory_gib = 70
path = "/m/qwen"
[models.old]
engine = "vllm"
port = 8202
memory_gib = 200
path = "/m/old"
env = { VLLM_FLASHINFER_MOE_BACKEND = "throughput" }
[models.mistral]
engine = "sglang"
port = 8203
source = "mistralai/Mistral-7B-Instruct-v0.1"
path = "/m/mistral"
"""


NVML = Path(__file__).resolve().parents[1] / "fixtures" / "nvml"
gb10 = json.loads((NVML / "gb10-constructed.json").read_text())
#: A GB10's compute capability, 12.1 (FACTS.md; no GB10 was at hand to capture it from).
GB10_CAPABILITY = ComputeCapability((12, 1))
#: The H200's, as NVML answered on the developers' GPU machine (9.0).
H200_CAPABILITY = read_compute_capability(FixtureNvml(json.loads(
    (NVML / "h200-capability.json").read_text())["captured"]))
NO_NVML = ComputeCapability(None, "NVML is not available: Driver Not Loaded")


def facts(**changes: Any) -> Facts:
    config = parse_config(CONFIG, source=Path("/etc/sparkd.toml"))
    base = Facts(
        config=config,
        rendered={"a.service": "x"},
        installed={"a.service": "x"},
        daemon_status=sb.status(daemon=sb.daemon(status_line="qwen: serving, healthy"),
                                active_model="qwen",
                                gpu=gpus_record(read(FixtureNvml(gb10["captured"])))),
        daemon_error=None,
        drop_caches_writable=True,
        mem_total=128 << 30,
        path_exists={"qwen": True, "old": True, "mistral": False},
        capability=GB10_CAPABILITY,
    )
    return dataclasses.replace(base, **changes)


def by_id(checks: list[Any]) -> dict[str, Any]:
    return {c.id: c for c in checks}


def test_the_runbook_checks() -> None:
    checks = by_id(diagnose(facts()))
    assert checks["daemon"].level is Level.OK
    assert checks["units"].level is Level.OK
    # Version unknown: the newest rules, where the pin is the flag and a pin that cannot run
    # is refused; on a GB10 (12.1) sparkd pins the throughput path, and says why.
    qwen = checks["moe_backend.qwen"]
    assert qwen.level is Level.OK
    assert qwen.message.startswith("qwen: MoE pin --moe-backend flashinfer_cutlass (set by "
                                   "sparkd; the form vLLM 0.24.0+ (the rules used) reads)")
    assert "do not run on this GPU (compute capability 12.1" in qwen.message
    assert "docs/watch.md" in qwen.message and qwen.fix == ""
    assert checks["engine_version.qwen"].level is Level.WARN
    assert "vllm version unknown" in checks["engine_version.qwen"].message
    old = checks["moe_backend.old"]
    # The model's own throughput pin, on a GPU where the latency path cannot run: no advice
    # to remove it (before: "froze the desktop", fix "remove it").
    assert old.level is Level.OK and "froze the desktop" not in old.message
    assert "rendered as --moe-backend flashinfer_cutlass" in old.message
    assert "remove" not in old.fix
    mem = checks["memory.old"]
    assert mem.level is Level.FAIL
    assert mem.message == "old needs 204.0 GiB with the reserve; the machine has 128.0 GiB"
    assert "memory.qwen" not in checks
    assert checks["weights.mistral"].fix == "sparkctl pull mistral"
    assert checks["role_policy.mistral"].level is Level.WARN
    assert checks["nvml"].message == "NVML sees NVIDIA GB10 (unified memory: figures from " \
        "/proc/meminfo)"


def test_no_daemon_stale_units_and_no_drop_caches() -> None:
    checks = by_id(diagnose(facts(daemon_status=None, daemon_error="no socket",
                                  installed={"a.service": None}, drop_caches_writable=False)))
    assert checks["daemon"].level is Level.FAIL
    assert checks["daemon"].message == "sparkd does not answer: no socket"
    assert checks["units"].level is Level.WARN
    assert checks["drop_caches"].level is Level.WARN
    assert "nvml" not in checks


def test_sparkctl_doctor_exit_status_and_json(tmp_path: Path) -> None:
    cfg = tmp_path / "c.toml"
    cfg.write_text(f'[daemon]\ncontrol_socket = "{tmp_path}/none.sock"\n'
                   f'unit_dir = "{tmp_path}/units"\n'
                   '[models.s]\nengine = "sim"\nport = 8101\n')
    res = CliRunner().invoke(cli, ["doctor", "--config", str(cfg)])
    assert res.exit_code == 1  # the daemon does not answer
    assert "FAIL  sparkd does not answer" in res.output
    assert ("fix: journalctl -u sparkd -n 50; systemctl reset-failed sparkd; "
            "systemctl start sparkd") in res.output
    res = CliRunner().invoke(cli, ["doctor", "--json", "--config", str(cfg)])
    assert '"id": "units"' in res.output


def test_the_moe_pin_in_the_form_the_detected_version_reads() -> None:
    """Before: doctor said VLLM_FLASHINFER_MOE_BACKEND=latency was in effect on every vLLM,
    though 0.24+ ignores it."""
    old = by_id(diagnose(facts(engine_versions={"qwen": "0.11.2"})))
    assert old["moe_backend.qwen"].message.startswith(
        "qwen: MoE pin VLLM_FLASHINFER_MOE_BACKEND=latency (set by sparkd; the form vLLM "
        "0.11.2 reads); the latency kernels do not run on this GPU (compute capability 12.1)")
    assert old["moe_backend.qwen"].level is Level.OK  # 0.11 does not refuse it
    assert old["engine_version.qwen"].level is Level.OK
    new = by_id(diagnose(facts(engine_versions={"qwen": "0.34.0"}, capability=ComputeCapability(
        (10, 0)))))
    assert new["moe_backend.qwen"].message == (
        "qwen: MoE pin --moe-backend flashinfer_trtllm (set by sparkd; the form vLLM 0.34.0 "
        "reads)")
    assert new["moe_backend.qwen"].level is Level.OK


def test_doctor_fails_when_the_engine_chose_another_backend_or_refused() -> None:
    def status_with(line: str) -> Status:
        """The status the daemon reports once the engine logged `line` (its fingerprints
        are what sparkd's matcher finds in it)."""
        prints = tuple(fingerprint_record(m) for m in match_lines([line], engine="vllm"))
        assert prints, line
        return sb.status(engines=[sb.engine("qwen", 8201, engine="vllm",
                                            fingerprints=prints)])

    wrong = by_id(diagnose(facts(daemon_status=status_with(
        "Using 'FLASHINFER_CUTLASS' NvFp4 MoE backend out of potential backends: "
        "['FLASHINFER_CUTLASS']."), engine_versions={"qwen": "0.33.0"},
        capability=ComputeCapability((10, 0)))))
    assert wrong["moe_chosen.qwen"].level is Level.FAIL
    assert wrong["moe_chosen.qwen"].message == (
        "qwen: the pin asks for flashinfer_trtllm, the engine chose flashinfer_cutlass")
    failed = by_id(diagnose(facts(daemon_status=status_with(
        "ValueError: NvFp4 MoE backend 'FLASHINFER_TRTLLM' does not support the "
        "deployment configuration since kernel does not support current device."),
        capability=NO_NVML)))
    assert failed["moe_chosen.qwen"].level is Level.FAIL
    assert "does not support the deployment configuration" in failed["moe_chosen.qwen"].message
    ok = by_id(diagnose(facts(daemon_status=status_with(
        "Using FLASHINFER_TRTLLM NvFp4 MoE backend out of potential backends: "
        "['FLASHINFER_TRTLLM']."), capability=ComputeCapability((10, 0)))))
    assert ok["moe_chosen.qwen"].level is Level.OK
    assert "moe_chosen.qwen" not in by_id(diagnose(facts()))  # nothing logged: nothing to say


def test_nothing_serving_is_a_warning_not_an_ok() -> None:
    """After a failed first start with no last good model, doctor said "ok  sparkd runs: no
    model configured to run" and exited 0 (issue 12's second review); nothing served."""
    assert "serving" not in by_id(diagnose(facts()))
    idle = sb.status(daemon=sb.daemon(status_line="nothing serves: no model is desired"))
    check = by_id(diagnose(facts(daemon_status=idle)))["serving"]
    assert (check.level, check.message) == (Level.WARN, "nothing serves: no model is desired")
    assert check.fix == "sparkctl swap MODEL (sparkctl models lists them)"  # no default_model
    config = parse_config(CONFIG.replace("[daemon]\n", '[daemon]\ndefault_model = "qwen"\n'),
                          source=Path("/etc/sparkd.toml"))
    check = by_id(diagnose(facts(daemon_status=idle, config=config)))["serving"]
    assert check.fix == "sparkctl swap qwen"
