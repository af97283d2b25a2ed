from __future__ import annotations

from sparkd.ctl.logs import entry, journal_argv, timeline_line


def test_argv_for_an_event_and_a_model_are_field_matches() -> None:
    argv = journal_argv(event="swap_done", model="qwen", since="10 min ago", follow=False,
                        lines=50)
    assert argv == ["journalctl", "-o", "json", "--no-pager", "--all", "--since=10 min ago",
                    "SPARKD_EVENT=swap_done", "SPARKD_MODEL=qwen"]


def test_argv_without_filters_selects_sparkd_and_engine_units_of_this_boot() -> None:
    argv = journal_argv(event=None, model=None, since=None, follow=False, lines=20)
    assert argv[:7] == ["journalctl", "-o", "json", "--no-pager", "--all", "-b", "--lines=20"]
    assert argv[7:] == ["-u", "sparkd.service", "-u", "sparkd-gateway.service",
                        "-u", "sparkd-engine@*.service"]


def test_follow() -> None:
    argv = journal_argv(event="rollback", model=None, since=None, follow=True, lines=5)
    assert "--follow" in argv and "-b" not in argv


def test_entry_and_timeline() -> None:
    raw = {
        "__REALTIME_TIMESTAMP": "1796136000123456",
        "_SYSTEMD_UNIT": "sparkd.service",
        "PRIORITY": "6",
        "MESSAGE": "swap 3: stop ok in 12 ms: stopped sparkd-engine@a.service",
        "SPARKD_EVENT": "swap_step",
        "SPARKD_MODEL": "b",
        "SPARKD_STEP": "stop",
        "SPARKD_DURATION_MS": "12.4",
        "_PID": "99",
    }
    e = entry(raw)
    assert e["time"] == "2026-12-01T14:40:00.123+00:00"
    assert e["systemd_unit"] == "sparkd.service"
    assert "pid" not in e
    line = timeline_line(e)
    assert line.startswith("14:40:00.123  swap_step          b ")
    assert line.endswith("stopped sparkd-engine@a.service  (12 ms)")


def test_engine_output_and_binary_messages() -> None:
    e = entry({"__REALTIME_TIMESTAMP": "0", "_SYSTEMD_UNIT": "sparkd-engine@a.service",
               "MESSAGE": [104, 105, 255]})
    assert e["message"] == "hi\ufffd"
    assert timeline_line(e).split()[1:3] == ["output", "sparkd-engine@a"]
