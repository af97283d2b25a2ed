from __future__ import annotations

import io

import status_builders as sb
from rich.console import Console

from sparkd.control.status import (
    FailureRecord,
    FingerprintRecord,
    MemoryRecord,
    ReloadRecord,
    Status,
)
from sparkd.ctl.status import format_age, render_status


def status() -> Status:
    return sb.status(
        daemon=sb.daemon(uptime_s=3700, pid=7, status_line="swapping a -> b: start",
                         last_reload=ReloadRecord(ok=False, message="bad key", at=0)),
        desired_model="a", last_good_model="a",
        swap=sb.swap("b", from_model="a", id=3, duration_ms=1500.0),
        last_failure=FailureRecord(model="crash", reason="start: job failed"),
        engines=[sb.engine("b", 8102, active_state="activating", healthy=False, engine="vllm",
                           main_pid=0, health=None, fingerprints=(FingerprintRecord(
                               id="moe_backend", severity="info", meaning="the MoE kernels",
                               value="CUTLASS", line="..."),))],
        memory=MemoryRecord(total_bytes=128 << 30, available_bytes=100 << 30,
                            page_cache_bytes=20 << 30),
    )


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


def test_render_status_says_what_is_wrong_with_sparkd_and_the_gateway() -> None:
    out = io.StringIO()
    s = sb.status(daemon=sb.daemon(config_refused="bad key", state_unsaved="No space left",
                                   config="/var/lib/sparkd/accepted.toml"))
    render_status(s, Console(file=out, width=200, color_system=None),
                  gateway=("failed", "start-limit-hit"))
    text = out.getvalue()
    assert "the config file is refused; running on the last accepted one " \
           "(/var/lib/sparkd/accepted.toml): bad key" in text
    assert "the state is not on disk: No space left" in text
    assert "gateway: failed (start-limit-hit)" in text
