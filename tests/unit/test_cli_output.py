from __future__ import annotations

import io
from typing import Any

from rich.console import Console

from sparkd.cli_output import format_age, render_status


def status() -> dict[str, Any]:
    return {
        "daemon": {"version": "0.1.0", "state": "running", "pid": 7, "uptime_s": 3700,
                   "status_line": "swapping a -> b: start", "state_warning": None,
                   "last_reload": {"ok": False, "message": "bad key", "at": 0}},
        "desired_model": "a", "active_model": None, "last_good_model": "a",
        "swap": {"id": 3, "from": "a", "to": "b", "step": "start", "duration_ms": 1500.0},
        "last_failure": {"model": "crash", "reason": "start: job failed"},
        "engines": [{"model": "b", "engine": "vllm", "active_state": "activating",
                     "sub_state": "start", "main_pid": 0, "n_restarts": 0, "port": 8102,
                     "health": None,
                     "fingerprints": [{"id": "moe_backend", "severity": "info",
                                       "meaning": "the MoE kernels", "value": "CUTLASS",
                                       "line": "..."}]}],
        "memory": {"total_bytes": 128 << 30, "available_bytes": 100 << 30,
                   "page_cache_bytes": 20 << 30},
    }


def test_render_status_says_what_is_going_on() -> None:
    out = io.StringIO()
    render_status(status(), Console(file=out, width=120, color_system=None))
    text = out.getvalue()
    assert "up 1h01m" in text
    assert "swap 3 in progress: a -> b, at start (1.5 s)" in text
    assert "last failure of crash: start: job failed" in text
    assert "last config reload failed (previous config kept): bad key" in text
    assert "activating/start" in text
    assert "b: moe_backend = CUTLASS (the MoE kernels)" in text
    assert "100.0 GiB available of 128.0 GiB, page cache 20.0 GiB" in text


def test_format_age() -> None:
    assert [format_age(s) for s in (5, 65, 3 * 3600 + 60, 3 * 86400)] == [
        "5s", "1m05s", "3h01m", "3d00h"]
