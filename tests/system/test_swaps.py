"""Swaps, rollbacks, crash loops and hung engines on a real systemd (issue 3).

One container for the module, with a config of fast simulated engines: `a` and `b` are good,
`crash` dies while loading, `hang` never becomes healthy, `flaky` serves then crashes every few
seconds, `huge` cannot fit the machine. Tests run in file order; each leaves `a` serving.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from checks import prop, serving, wait_for
from checks import status as maybe_status
from harness import Container

pytestmark = pytest.mark.system

CONFIG = """
[daemon]
default_model = "a"
memory_reserve_gib = 1
health_interval_s = 1
hung_after_failures = 3
last_good_after_s = 3
restart_sec = 0.5
start_limit_burst = 3
start_limit_interval_s = 120
settle_timeout_s = 2

[models.a]
engine = "sim"
port = 8101
memory_gib = 0.1
load_timeout_s = 30
args = ["--load-seconds", "1", "--resident-mib", "32", "--weights-mib", "16"]

[models.b]
engine = "sim"
port = 8102
memory_gib = 0.1
load_timeout_s = 30
args = ["--load-seconds", "3", "--resident-mib", "32", "--weights-mib", "16"]

[models.crash]
engine = "sim"
port = 8103
load_timeout_s = 30
args = ["--load-seconds", "2", "--crash-after", "0.5", "--weights-mib", "8"]

[models.hang]
engine = "sim"
port = 8104
load_timeout_s = 3
args = ["--hang-on-start", "--weights-mib", "8"]

[models.flaky]
engine = "sim"
port = 8105
load_timeout_s = 30
args = ["--load-seconds", "0.3", "--crash-after", "2.5", "--weights-mib", "8"]

[models.huge]
engine = "sim"
port = 8106
memory_gib = 100000

[models.spec]
engine = "sim"
port = 8107
load_timeout_s = 30
args = ["--load-seconds", "0.5", "--weights-mib", "8", "--tokens-per-second", "100"]
[models.spec.speculative]
method = "eagle3"
draft_model = "sim-draft"
port = 8117
"""


def sh(box: Container, script: str, *, check: bool = True) -> subprocess.CompletedProcess[str]:
    return box.sh(script, check=check, timeout=180)


def status(box: Container) -> dict[str, Any]:
    s = maybe_status(box)
    assert s is not None, "sparkd does not answer"
    return s


def events(box: Container, name: str, since: str) -> list[dict[str, Any]]:
    out = box.exec(["journalctl", f"SPARKD_EVENT={name}", f"--since={since}", "-o", "json",
                    "--no-pager"]).stdout
    return [json.loads(line) for line in out.splitlines()]


def now(box: Container) -> str:
    return box.exec(["date", "+%Y-%m-%d %H:%M:%S"]).stdout.strip()


@pytest.fixture(scope="module")
def box(container: Container) -> Iterator[Container]:
    container.exec(["systemctl", "stop", "sparkd", "sparkd-engine@*"])
    container.exec(["tee", "/etc/sparkd.toml"], input=CONFIG)
    container.exec(["rm", "-f", "/var/lib/sparkd/state.toml"])
    container.exec(["systemctl", "start", "sparkd"])
    # sparkd propagates its reload to the gateway, which takes the new models in place.
    container.exec(["systemctl", "reload", "sparkd"])
    wait_for("a to serve", lambda: serving(container, "a"))
    wait_for("a to become the last good model",
             lambda: status(container)["last_good_model"] == "a", timeout=30)
    yield container


def swap(box: Container, *args: str) -> subprocess.CompletedProcess[str]:
    return box.exec(["sparkctl", "swap", *args], check=False, timeout=180)


def test_swap_a_to_b_and_back(box: Container) -> None:
    since = now(box)
    a_pid = prop(box, "sparkd-engine@a.service", "MainPID")
    res = swap(box, "b")
    assert res.returncode == 0, res.stdout + res.stderr
    for step in ("preflight", "stop", "start", "health_gate", "flip"):
        assert f"  {step}" in res.stdout
    assert "b serves (swap took" in res.stdout
    assert serving(box, "b")
    assert prop(box, "sparkd-engine@a.service", "ActiveState") == "inactive"
    assert status(box)["desired_model"] == "b"
    res = swap(box, "a", "--json")
    assert res.returncode == 0, res.stdout + res.stderr
    lines = [json.loads(line) for line in res.stdout.splitlines()]
    assert lines[0]["event"] == "accepted" and lines[-1]["event"] == "done"
    assert [x["step"] for x in lines if x["event"] == "step"] == [
        "preflight", "stop", "start", "health_gate", "flip"]
    assert serving(box, "a")
    assert prop(box, "sparkd-engine@a.service", "MainPID") != a_pid
    done = events(box, "swap_done", since)
    assert [(e["SPARKD_FROM"], e["SPARKD_TO"]) for e in done] == [("a", "b"), ("b", "a")]
    steps = events(box, "swap_step", since)
    assert {e["SPARKD_STEP"] for e in steps} == {"preflight", "stop", "start", "health_gate",
                                                 "flip"}
    assert all(float(e["SPARKD_DURATION_MS"]) >= 0 for e in steps)


def test_dry_run_prints_the_plan_and_changes_nothing(box: Container) -> None:
    res = swap(box, "b", "--dry-run")
    assert res.returncode == 0, res.stderr
    assert "swap a -> b" in res.stdout
    assert "stop sparkd-engine@a.service" in res.stdout
    assert "on failure: stop sparkd-engine@b.service, start a" in res.stdout
    assert serving(box, "a")


def test_swap_to_a_model_that_crashes_on_start_rolls_back(box: Container) -> None:
    since = now(box)
    res = swap(box, "crash")
    assert res.returncode == 7, res.stdout + res.stderr
    # The real reason first (the engine exited before it became healthy), then the job's.
    assert "swap to crash failed at start: wait-healthy: http://127.0.0.1:8103/health: the " \
           "engine (pid" in res.stderr
    assert "(sparkd-engine@crash.service start job failed" in res.stderr
    assert "rolled back to a" in res.stderr
    assert "cuda_oom" in res.stderr  # the engine's last words, fingerprinted
    wait_for("a to serve again", lambda: serving(box, "a"))
    assert prop(box, "sparkd-engine@crash.service", "ActiveState") in ("inactive", "failed")
    s = status(box)
    assert s["last_failure"]["model"] == "crash"
    assert events(box, "rollback", since)
    assert events(box, "swap_failed", since)[0]["SPARKD_TO"] == "crash"


def test_swap_to_a_model_that_hangs_while_loading_times_out_and_rolls_back(
    box: Container,
) -> None:
    res = swap(box, "hang")
    assert res.returncode == 7, res.stdout + res.stderr
    assert "swap to hang failed at start" in res.stderr
    assert "not healthy after" in res.stderr  # wait-healthy's own words, from the journal
    wait_for("a to serve again", lambda: serving(box, "a"))
    assert prop(box, "sparkd-engine@hang.service", "ActiveState") in ("inactive", "failed")


def test_unknown_model_is_a_clear_error_and_changes_nothing(box: Container) -> None:
    pid = prop(box, "sparkd-engine@a.service", "MainPID")
    res = swap(box, "nope")
    assert res.returncode == 6
    assert "unknown model 'nope'" in res.stderr
    assert prop(box, "sparkd-engine@a.service", "MainPID") == pid


def test_memory_gate_refusal_keeps_the_old_model_serving(box: Container) -> None:
    pid = prop(box, "sparkd-engine@a.service", "MainPID")
    res = swap(box, "huge")
    assert res.returncode == 9, res.stdout + res.stderr
    assert "huge needs 100000 GiB + 1 GiB reserve, more than this machine's" in res.stderr
    assert prop(box, "sparkd-engine@a.service", "MainPID") == pid
    assert serving(box, "a")


def test_two_swaps_at_once(box: Container) -> None:
    first = swap(box, "b", "--no-wait")
    assert first.returncode == 0, first.stderr
    second = swap(box, "a")
    assert second.returncode == 8, second.stdout + second.stderr
    assert "(a -> b) is in progress" in second.stderr
    wait_for("b to serve", lambda: serving(box, "b"))
    assert swap(box, "a").returncode == 0


def test_kill_9_of_sparkd_mid_swap_converges_to_the_target(box: Container) -> None:
    since = now(box)
    res = swap(box, "b", "--no-wait")
    assert res.returncode == 0, res.stderr
    wait_for("the swap to reach its start step",
             lambda: (status(box)["swap"] or {}).get("step") == "start", timeout=20)
    old = prop(box, "sparkd.service", "MainPID")
    box.exec(["systemctl", "kill", "--signal=SIGKILL", "sparkd.service"])
    wait_for("sparkd to come back",
             lambda: prop(box, "sparkd.service", "MainPID") not in ("0", old))
    wait_for("b to serve", lambda: serving(box, "b"), timeout=60)
    assert events(box, "swap_resumed", since)
    assert prop(box, "sparkd-engine@a.service", "ActiveState") == "inactive"
    assert swap(box, "a").returncode == 0


def test_hung_engine_is_restarted(box: Container) -> None:
    since = now(box)
    pid = prop(box, "sparkd-engine@a.service", "MainPID")
    box.exec(["kill", "-STOP", pid])
    wait_for("sparkd to restart the hung engine",
             lambda: prop(box, "sparkd-engine@a.service", "MainPID") not in ("0", pid),
             timeout=60)
    wait_for("a to serve again", lambda: serving(box, "a"))
    hung = events(box, "engine_hung", since)
    assert hung and hung[0]["SPARKD_MODEL"] == "a"
    assert f"process {pid} alive, 3 health checks failed in a row" in hung[0]["MESSAGE"]


def test_crash_loop_of_the_active_engine_rolls_back_to_the_last_good(box: Container) -> None:
    since = now(box)
    res = swap(box, "flaky")
    assert res.returncode == 0, res.stdout + res.stderr
    # flaky crashes every 2.5 s; systemd restarts it until the start limit (3), then sparkd
    # hears of it by signal and rolls back to a.
    wait_for("the rollback to a", lambda: serving(box, "a"), timeout=90)
    loop = events(box, "engine_crash_loop", since)
    assert loop and loop[0]["SPARKD_MODEL"] == "flaky"
    assert events(box, "engine_restarted", since)
    s = status(box)
    assert s["last_failure"]["model"] == "flaky"
    assert s["last_failure"]["reason"].startswith("crash loop: systemd gave up after ")
    assert prop(box, "sparkd-engine@flaky.service", "ActiveState") in ("inactive", "failed")


def test_speculative_variant_runs_beside_the_plain_one_and_the_gateway_routes_by_class(
    box: Container,
) -> None:
    res = swap(box, "spec")
    assert res.returncode == 0, res.stdout + res.stderr
    wait_for("the speculative variant to be active",
             lambda: prop(box, "sparkd-engine@spec:spec.service", "ActiveState") == "active")
    wait_for("the gateway to see both variants healthy", lambda: all(
        (e["health"] or {}).get("ok") for e in status(box)["engines"] if e["model"] == "spec"),
        timeout=30)
    argv = prop(box, "sparkd-engine@spec:spec.service", "ExecStart")
    assert "--speculative" in argv and "--port 8117" in argv

    def variant_for(body: dict[str, Any]) -> str:
        out = box.exec(["curl", "-s", "-D", "-", "-o", "/dev/null", "http://127.0.0.1:8000/v1/"
                        "chat/completions", "-H", "Content-Type: application/json", "-d",
                        json.dumps({"model": "spec", "max_tokens": 4, **body})]).stdout
        headers = dict(line.split(": ", 1) for line in out.splitlines() if ": " in line)
        return headers["X-Sparkd-Variant"].strip()

    chat = {"messages": [{"role": "user", "content": "tell me a story"}]}
    structured = {**chat, "response_format": {"type": "json_object"}}
    wait_for("the gateway to route chat to the speculative engine",
             lambda: variant_for(chat) == "speculative", timeout=30)
    assert variant_for(structured) == "plain"
    assert swap(box, "a").returncode == 0
    assert prop(box, "sparkd-engine@spec:spec.service", "ActiveState") == "inactive"


def test_recover_brings_back_an_engine_stopped_by_hand(box: Container) -> None:
    wait_for("a to serve", lambda: serving(box, "a"), timeout=90)
    box.exec(["systemctl", "stop", "sparkd-engine@a.service"])
    wait_for("sparkd to see a stopped", lambda: status(box)["active_model"] is None)
    assert status(box)["desired_model"] == "a"
    res = box.exec(["sparkctl", "recover"], check=False, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "nothing -> a accepted" in res.stdout and "a serves (swap took" in res.stdout
    assert serving(box, "a")
    again = box.exec(["sparkctl", "recover", "--json"], check=False, timeout=60)
    assert again.returncode == 0, again.stdout + again.stderr
    assert json.loads(again.stdout) == {"event": "noop", "model": "a"}


def test_logs_show_the_timeline(box: Container) -> None:
    res = box.exec(["sparkctl", "logs", "--event", "swap_done", "--json"])
    entries = [json.loads(line) for line in res.stdout.splitlines()]
    assert entries and all(e["sparkd_event"] == "swap_done" for e in entries)
    assert all(float(e["sparkd_duration_ms"]) > 0 for e in entries)
    text = box.exec(["sparkctl", "logs", "--model", "b", "-n", "400"]).stdout
    assert "swap_step" in text and "ready on 127.0.0.1:8102" in text
