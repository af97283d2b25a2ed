"""What a second pair of eyes found (hostile client, new operator), each as a test that fails
on the code before its fix."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from fakes import build, run, started

from sparkd.control.aio_client import _result
from sparkd.control.protocol import Request
from sparkd.ctl.logs import timeline_line
from sparkd.ctl.main import cli
from sparkd.errors import BadRequest, SchemaError
from sparkd.gateway.state import BAD_MESSAGES_KEPT, GatewayState

CONFIG = """
[daemon]
default_model = "a"
state_dir = "{state}"
[models.a]
engine = "sim"
port = 9001
[models.b]
engine = "sim"
port = 9002
"""


@pytest.mark.parametrize("line", [b"[]\n", b"1\n", b"\"x\"\n", b"{not json\n"])
def test_a_reply_that_is_not_an_object_is_a_schema_error(line: bytes) -> None:
    with pytest.raises(SchemaError, match="reply from sparkd"):
        _result(line, Path("/run/sparkd/control.sock"))


@pytest.mark.parametrize("reason", ["\ud800 odd", "x" * 201, "line\nbreak", 5])
def test_a_swap_reason_must_be_short_printable_text(tmp_path: Path, reason: object) -> None:
    w = build(tmp_path, CONFIG)
    run(started(w.sup))
    with pytest.raises(BadRequest, match="reason"):
        run(w.sup.handle(Request("swap", {"model": "b", "reason": reason})))


def test_schema_mismatches_are_logged_by_path_and_never_flood(
    caplog: pytest.LogCaptureFixture,
) -> None:
    state = GatewayState()
    for i in range(3):
        state.bad_message(f"status.daemon.uptime_s: expected a number, got '{i}'")
    assert len(caplog.records) == 1  # one path, whatever the value
    for i in range(BAD_MESSAGES_KEPT * 2):
        state.bad_message(f"status.x{i}: expected a number, got 1")
    assert len(caplog.records) == BAD_MESSAGES_KEPT + 1  # then one "further reasons" line


def test_a_link_failure_is_a_warning_once_per_kind(caplog: pytest.LogCaptureFixture) -> None:
    state = GatewayState()
    for _ in range(3):
        state.link_failed("PermissionDenied: uid 998 may not use sparkd")
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "uid 998" in warnings[0].getMessage()
    assert state.last_link_error == "PermissionDenied: uid 998 may not use sparkd"


@pytest.mark.parametrize("timeout", ["0", "-1", "nan", "inf"])
def test_swap_timeouts_are_checked_by_click(timeout: str) -> None:
    res = CliRunner().invoke(cli, ["swap", "a", "--timeout", timeout])
    assert res.exit_code == 2 and "--timeout" in res.output


def test_a_duration_the_message_already_says_is_not_said_twice() -> None:
    line = timeline_line({"time": "2026-12-03T12:00:00.000", "sparkd_event": "swap_done",
                          "sparkd_model": "a", "message": "swap 1: a serves (7845 ms)",
                          "sparkd_duration_ms": "7845.2"})
    assert line.count("7845 ms") == 1
