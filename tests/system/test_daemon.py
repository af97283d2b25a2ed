"""sparkd as a real service in a booted systemd: the walking skeleton, end to end.

The tests of this module share one container (the `container` fixture: the .deb installed,
sparkd.service active with the shipped /etc/sparkd.toml) and run in file order; each leaves
sparkd running with the default model serving.
"""

from __future__ import annotations

import json
from typing import Any

import checks
import pytest
from checks import status, wait_for
from harness import Container

pytestmark = pytest.mark.system

DEFAULT = "sim-small"
ENGINE = f"sparkd-engine@{DEFAULT}.service"


def show(box: Container, unit: str, *props: str) -> dict[str, str]:
    out = box.exec(["systemctl", "show", unit, "--property=" + ",".join(props)]).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


def status_json(box: Container) -> dict[str, Any]:
    s = status(box)
    assert s is not None, "sparkd does not answer"
    return s


def serving(box: Container) -> bool:
    return checks.serving(box, DEFAULT) and (
        show(box, "sparkd.service", "StatusText")["StatusText"] == f"{DEFAULT}: serving, healthy")


def test_sparkd_runs_and_the_default_model_serves(container: Container) -> None:
    wait_for("sparkd to report the default model healthy", lambda: serving(container))
    engine = show(container, ENGINE, "ActiveState", "SubState", "User")
    assert engine == {"ActiveState": "active", "SubState": "running", "User": "sparkd-engine"}
    models = container.exec(["curl", "-sf", "http://127.0.0.1:8101/v1/models"]).stdout
    assert json.loads(models)["data"][0]["id"] == DEFAULT
    text = container.exec(["systemctl", "status", "sparkd", "--no-pager"], check=False).stdout
    assert "Active: active (running)" in text
    assert f'Status: "{DEFAULT}: serving, healthy"' in text


def test_prestart_ran_and_logged_its_steps(container: Container) -> None:
    log = container.exec(["journalctl", "-b", "-u", ENGINE, "--no-pager", "-o", "cat"]).stdout
    for step in ("sync:", "drop_caches: freed", "settle:", "memory gate: ok"):
        assert f"prestart {DEFAULT}: {step}" in log
    # The real drop_caches path, not the fallback: the container's /proc/sys is writable.
    assert "fell back to posix_fadvise" not in log


def test_status_json_agrees_with_systemctl_show(container: Container) -> None:
    status = status_json(container)
    assert status["daemon"]["state"] == "running"
    assert status["desired_model"] == status["active_model"] == DEFAULT
    for engine in status["engines"]:
        s = show(container, engine["unit"], "ActiveState", "SubState", "MainPID", "NRestarts")
        assert engine["active_state"] == s["ActiveState"]
        assert engine["sub_state"] == s["SubState"]
        assert engine["main_pid"] == int(s["MainPID"])
        assert engine["n_restarts"] == int(s["NRestarts"])
    daemon_pid = int(show(container, "sparkd.service", "MainPID")["MainPID"])
    assert status["daemon"]["pid"] == daemon_pid
    assert status["memory"]["total_bytes"] > status["memory"]["available_bytes"] > 0


def test_events_are_structured_journal_entries(container: Container) -> None:
    out = container.exec(
        ["journalctl", "-b", "SPARKD_EVENT=engine_starting", "-o", "json", "--no-pager"]
    ).stdout
    entries = [json.loads(line) for line in out.splitlines()]
    assert entries, "no engine_starting event in the journal"
    assert entries[0]["SPARKD_MODEL"] == DEFAULT
    assert entries[0]["_SYSTEMD_UNIT"] == "sparkd.service"
    assert entries[0]["PRIORITY"] == "6"


def test_engine_journal_carries_the_model_field(container: Container) -> None:
    out = container.exec(
        [
            "journalctl",
            "-b",
            f"SPARKD_MODEL={DEFAULT}",
            f"_SYSTEMD_UNIT={ENGINE}",
            "-o",
            "cat",
            "--no-pager",
        ]
    ).stdout
    assert "ready on 127.0.0.1:8101" in out


def test_kill_9_of_sparkd_leaves_the_engine_alone(container: Container) -> None:
    before = show(container, ENGINE, "MainPID", "NRestarts")
    old_pid = show(container, "sparkd.service", "MainPID")["MainPID"]
    container.exec(["systemctl", "kill", "--signal=SIGKILL", "sparkd.service"])
    wait_for(
        "systemd to restart sparkd",
        lambda: show(container, "sparkd.service", "MainPID")["MainPID"] not in ("0", old_pid),
    )
    wait_for("sparkd to serve again", lambda: serving(container))
    assert show(container, ENGINE, "MainPID", "NRestarts") == before
    log = container.exec(
        ["journalctl", "-b", "SPARKD_EVENT=engine_adopted", "-o", "cat", "--no-pager"]
    ).stdout
    assert f"adopted running engine {DEFAULT} (pid {before['MainPID']}" in log


def test_watchdog_kills_and_restarts_a_hung_sparkd(container: Container) -> None:
    container.sh(
        "mkdir -p /run/systemd/system/sparkd.service.d && "
        "printf '[Service]\\nWatchdogSec=3\\n' > /run/systemd/system/sparkd.service.d/wd.conf && "
        "systemctl daemon-reload && systemctl restart sparkd"
    )
    try:
        wait_for("sparkd to serve", lambda: serving(container))
        engine_before = show(container, ENGINE, "MainPID")
        pid = show(container, "sparkd.service", "MainPID")["MainPID"]
        container.exec(["kill", "-STOP", pid])
        wait_for(
            "the watchdog to restart sparkd",
            lambda: show(container, "sparkd.service", "MainPID")["MainPID"] not in ("0", pid),
            timeout=30,
        )
        log = container.exec(["journalctl", "-b", "-u", "sparkd", "--no-pager"]).stdout
        assert "Watchdog timeout" in log
        wait_for("sparkd to serve again", lambda: serving(container))
        assert show(container, ENGINE, "MainPID") == engine_before
    finally:
        container.sh("rm -rf /run/systemd/system/sparkd.service.d && systemctl daemon-reload")


def test_invalid_config_on_sighup_is_rejected_and_the_old_one_kept(container: Container) -> None:
    container.sh("cp /etc/sparkd.toml /root/sparkd.toml.good")
    try:
        container.sh("sed -i 's/^port = 8101/port = \"81x\"/' /etc/sparkd.toml")
        check = container.exec(["sparkd", "check-config"], check=False)
        assert check.returncode == 2
        assert 'models.sim-small.port: expected an integer from 1 to 65535, got "81x"' in (
            check.stderr
        )
        # A refused config fails the reload itself (ExecReload= is `sparkd reload`).
        refused = container.exec(["systemctl", "reload", "sparkd"], check=False)
        assert refused.returncode != 0
        wait_for(
            "the rejection to show in STATUS",
            lambda: (
                "config reload failed, previous config kept"
                in show(container, "sparkd.service", "StatusText")["StatusText"]
            ),
        )
        status = status_json(container)
        assert status["daemon"]["last_reload"]["ok"] is False
        assert "models.sim-small.port" in status["daemon"]["last_reload"]["message"]
        assert show(container, "sparkd.service", "ActiveState")["ActiveState"] == "active"
        assert {e["port"] for e in status["engines"]} == {8101, 8102}
        unit = container.exec(["systemctl", "cat", ENGINE]).stdout
        assert "--port 8101" in unit
    finally:
        container.sh("cp /root/sparkd.toml.good /etc/sparkd.toml && systemctl reload sparkd")
    wait_for("sparkd to serve with the good config", lambda: serving(container))


def test_garbage_state_file_is_kept_aside_and_sparkd_comes_up(container: Container) -> None:
    container.sh(
        "systemctl stop sparkd && printf '\\000garbage[[\\n' > /var/lib/sparkd/state.toml && "
        "systemctl start sparkd"
    )
    wait_for("sparkd to serve", lambda: serving(container))
    aside = container.sh("ls /var/lib/sparkd/").stdout.split()
    kept = [name for name in aside if name.startswith("state.toml.corrupt-")]
    assert len(kept) == 1, aside
    assert container.sh(f"cat /var/lib/sparkd/{kept[0]}").stdout == "\x00garbage[[\n"
    status = status_json(container)
    assert kept[0] in status["daemon"]["state_warning"]
    assert status["desired_model"] == DEFAULT
    # The new state file is valid again.
    assert 'desired_model = "sim-small"' in container.sh("cat /var/lib/sparkd/state.toml").stdout


def test_sigterm_stops_sparkd_cleanly_and_leaves_the_engine(container: Container) -> None:
    engine_before = show(container, ENGINE, "MainPID", "NRestarts")
    container.exec(["systemctl", "stop", "sparkd"])
    s = show(container, "sparkd.service", "ActiveState", "Result")
    assert s == {"ActiveState": "inactive", "Result": "success"}
    assert "clean_shutdown = true" in container.sh("cat /var/lib/sparkd/state.toml").stdout
    assert show(container, ENGINE, "MainPID", "NRestarts") == engine_before
    no_daemon = container.exec(["sparkctl", "status"], check=False)
    assert no_daemon.returncode == 3
    assert "sparkd is not running" in no_daemon.stderr
    container.exec(["systemctl", "start", "sparkd"])
    wait_for("sparkd to serve", lambda: serving(container))
    assert show(container, ENGINE, "MainPID", "NRestarts") == engine_before


def test_doctor_passes_on_the_default_install(container: Container) -> None:
    wait_for("sparkd to serve", lambda: serving(container))
    res = container.exec(["sparkctl", "doctor"], check=False)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "ok  sparkd runs: sim-small: serving, healthy" in res.stdout
    assert "engine units match the config" in res.stdout
    assert "/proc/sys/vm/drop_caches is writable" in res.stdout


def test_models_lists_every_model_with_what_serves(container: Container) -> None:
    wait_for("sparkd to serve", lambda: serving(container))
    res = container.exec(["sparkctl", "models", "--json"])
    listing = json.loads(res.stdout)
    assert listing["daemon"] == {"reachable": True, "error": None}
    models = {m["name"]: m for m in listing["models"]}
    assert sorted(models) == ["sim-large", "sim-small"]
    small, large = models[DEFAULT], models["sim-large"]
    assert small["active"] is True and small["desired"] is True
    assert small["unit"] == {"name": ENGINE, "active_state": "active", "sub_state": "running"}
    assert large["active"] is False
    # The simulated models have no source and no manifest: nothing to pull, and it says why.
    assert small["files"]["state"] == "unknown" and small["next"] is None
    assert "no manifest for sim-small" in small["files"]["note"]
    human = container.exec(["sparkctl", "models"], env={"COLUMNS": "160"}).stdout
    assert "active" in human and "did not answer" not in human
