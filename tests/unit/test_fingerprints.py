"""Log fingerprints against the lines each supported vLLM release really writes.

Each line below is built the way the cited upstream code formats it (logger prefix as vLLM's
logger prints it: `LEVEL MM-DD HH:MM:SS [file.py:line] message`).
"""

from __future__ import annotations

import pytest

from sparkd.engine.fingerprints import (
    MOE_BACKEND,
    MOE_REFUSED,
    check_moe_backend,
    chosen_moe_backend,
    fatal_match,
    match_lines,
)

# (release, line, backend in --moe-backend words)
CHOSEN = [
    # vllm 0.34.0 fused_moe/oracle/base.py make_log_backend
    ("0.34.0", "(EngineCore pid=812) INFO 12-03 10:01:02 [base.py:166] Using FLASHINFER_TRTLLM "
     "NvFp4 MoE backend out of potential backends: ['FLASHINFER_TRTLLM', "
     "'FLASHINFER_CUTLASS', 'MARLIN'].", "flashinfer_trtllm"),
    ("0.34.0", "INFO 12-03 10:01:02 [base.py:166] Using FLASHINFER_CUTLASS Fp8 MoE LoRA "
     "backend.", "flashinfer_cutlass"),
    # vllm 0.33.0 fused_moe/oracle/nvfp4.py (quoted) and fp8.py (not quoted)
    ("0.33.0", "INFO 12-03 10:01:02 [nvfp4.py:242] Using 'FLASHINFER_CUTLASS' NvFp4 MoE backend "
     "out of potential backends: ['FLASHINFER_CUTLASS', 'VLLM_CUTLASS'].", "flashinfer_cutlass"),
    ("0.33.0", "INFO 12-03 10:01:02 [fp8.py:422] Using TRITON Fp8 MoE backend out of potential "
     "backends: ['TRITON'].", "triton"),
    ("0.26.0", "INFO 12-03 10:01:02 [mxfp4.py:394] Using 'MARLIN' Mxfp4 MoE backend.", "marlin"),
    ("0.23.0", "INFO 12-03 10:01:02 [int8.py:104] Using TRITON W4A8 Int8 MoE backend out of "
     "potential backends: ['TRITON'].", "triton"),
    # vllm 0.11.2 quantization/modelopt.py and quantization/fp8.py
    ("0.11.2", "INFO 12-03 10:01:02 [modelopt.py:1178] Using FlashInfer CUTLASS kernels for "
     "ModelOptNvFp4FusedMoE.", "flashinfer_cutlass"),
    ("0.11.2", "INFO 12-03 10:01:02 [modelopt.py:371] Using FlashInfer TensorRT-LLM kernels",
     "flashinfer_trtllm"),
    ("0.11.2", "INFO 12-03 10:01:02 [fp8.py:138] Using FlashInfer FP8 MoE TRTLLM backend for "
     "SM100", "flashinfer_trtllm"),
]


@pytest.mark.parametrize(("release", "line", "backend"), CHOSEN)
def test_the_chosen_moe_backend_of_each_release(release: str, line: str, backend: str) -> None:
    found = match_lines(["INFO loading weights", line, "unrelated"], engine="vllm")
    assert [m.fingerprint.id for m in found] == [MOE_BACKEND], release
    assert chosen_moe_backend(found) == backend
    assert found[0].to_json()["backend"] == backend
    assert fatal_match(found) is None


REFUSED = [
    # vllm 0.34.0 oracle/base.py make_log_unsupported (raised as ValueError)
    ("0.34.0", "ValueError: NvFp4 MoE backend 'FLASHINFER_TRTLLM' does not support the "
     "deployment configuration since kernel does not support current device cuda:sm121.",
     "flashinfer_trtllm"),
    # vllm 0.33.0 fp8.py: no quotes when a reason follows
    ("0.33.0", "ValueError: FP8 MoE backend FLASHINFER_TRTLLM does not support the deployment "
     "configuration since kernel does not support current device.", "flashinfer_trtllm"),
    ("0.23.0", "ValueError: Mxfp4 MoE backend 'FLASHINFER_CUTLASS' does not support the "
     "deployment configuration.", "flashinfer_cutlass"),
]


@pytest.mark.parametrize(("release", "line", "backend"), REFUSED)
def test_a_refused_backend_is_fatal(release: str, line: str, backend: str) -> None:
    found = match_lines(["Traceback (most recent call last):", line], engine="vllm")
    fatal = fatal_match(found)
    assert fatal is not None and fatal.fingerprint.id == MOE_REFUSED, release
    assert fatal.fingerprint.severity == "error"
    assert fatal.backend == backend
    assert fatal.line == line
    check = check_moe_backend(backend, found)
    assert check.ok is False and line in check.message


def test_unknown_and_deprecated_variables() -> None:
    lines = [
        # vllm 0.33.0/0.34.0 platforms/interface.py validate_environ
        "WARNING 12-03 10:00:01 [interface.py:1470] Unknown vLLM environment variable "
        "detected: VLLM_FLASHINFER_MOE_BACKEND",
        # vllm 0.23.0 envs.py deprecated_env (a FutureWarning)
        "/opt/vllm/lib/python3.12/site-packages/vllm/envs.py:1710: FutureWarning: "
        "VLLM_FLASHINFER_MOE_BACKEND is deprecated and will be removed in v0.23. Use "
        "--moe-backend flashinfer_trtllm, flashinfer_cutlass, or flashinfer_cutedsl.",
    ]
    found = {m.fingerprint.id: m for m in match_lines(lines, engine="vllm")}
    assert found["unknown_vllm_env"].value == "VLLM_FLASHINFER_MOE_BACKEND"
    assert found["unknown_vllm_env"].fingerprint.severity == "warning"
    assert found["deprecated_vllm_env"].value == "VLLM_FLASHINFER_MOE_BACKEND"


def test_vllm_patterns_only_for_vllm_and_sim_speaks_the_variable() -> None:
    line = CHOSEN[0][1]
    assert match_lines([line], engine="sglang") == []
    assert match_lines(["Using FlashInfer MoE backend: latency"], engine="llamacpp") == []
    (sim,) = match_lines(["Using FlashInfer MoE backend: latency"], engine="sim")
    assert sim.value == "latency" and sim.backend == "flashinfer_trtllm"


def test_every_fingerprint_cites_its_source() -> None:
    from sparkd.engine.fingerprints import FINGERPRINTS

    assert all(f.source for f in FINGERPRINTS)


@pytest.mark.parametrize(
    ("expected", "line", "ok"),
    [
        ("flashinfer_trtllm", CHOSEN[0][1], True),
        ("flashinfer_trtllm", CHOSEN[2][1], False),  # asked TRT-LLM, got CUTLASS
        ("flashinfer_cutlass", CHOSEN[6][1], True),  # 0.11's words, compared in flag words
        ("auto", CHOSEN[2][1], None),
        ("flashinfer_trtllm", "INFO no MoE line at all", None),
    ],
)
def test_check_moe_backend(expected: str, line: str, ok: bool | None) -> None:  # noqa: FBT001
    check = check_moe_backend(expected, match_lines([line], engine="vllm"))
    assert check.ok is ok, check.message
    if ok is False:
        assert "the engine chose flashinfer_cutlass" in check.message


def test_status_shows_the_engine_version_and_the_backend_it_chose() -> None:
    from pathlib import Path

    from sparkd.config import ModelConfig
    from sparkd.daemon.engines import EngineView
    from sparkd.daemon.report import engine_record
    from sparkd.systemd.manager import UnitStatus

    model = ModelConfig(name="q", engine="vllm", path=Path("/m"), port=1)
    view = EngineView(model=model, unit=UnitStatus(model.unit_name), engine_version="0.33.0",
                      fingerprints=match_lines([CHOSEN[2][1]], engine="vllm"))
    shown = engine_record(view)
    assert shown.engine_version == "0.33.0"  # detected
    assert shown.moe_backend == "flashinfer_cutlass"
    pinned = EngineView(model=ModelConfig(name="q", engine="vllm", path=Path("/m"), port=1,
                                          engine_version="0.34.0"),
                        unit=UnitStatus(model.unit_name), engine_version="0.33.0")
    assert engine_record(pinned).engine_version == "0.34.0"  # the config's pin wins
    assert engine_record(pinned).moe_backend is None
