"""Power cuts (issue 12) at the three moments that matter: while serving, in the middle of a
swap, in the middle of a `sparkctl pull`. A power cut is SIGKILL of the container's PID 1
(every process dies at once, nothing runs a line of cleanup); the next boot is the same disk
booted again. Judged by what systemd, the engines, the gateway and the files say.

What the harness's cut does not do: lose written data (the container's disk is a tmpfs of
the host, so unsynced bytes survive). Torn writes are not made here.
"""

from __future__ import annotations

import json
import shlex
import time

import pytest
from checks import prop, serving, status, wait_for
from harness import Container

pytestmark = pytest.mark.system

CONFIG = """
[daemon]
default_model = "a"
memory_reserve_gib = 1
health_interval_s = 1
last_good_after_s = 2
settle_timeout_s = 2

[models.a]
engine = "sim"
port = 8101
memory_gib = 0.1
load_timeout_s = 30
args = ["--load-seconds", "0.5", "--weights-mib", "8"]

[models.b]
engine = "sim"
port = 8102
memory_gib = 0.1
load_timeout_s = 30
args = ["--load-seconds", "6", "--weights-mib", "8"]

[models.tiny]
engine = "sim"
port = 8103
memory_gib = 0.1
path = "/var/lib/sparkd/models/tiny"
source = "hf://org/tiny"
"""
ACCEPTED = "/var/lib/sparkd/accepted.toml"
MIB = 1 << 20


def fresh(box: Container) -> None:
    """sparkd, the gateway and every engine stopped, no state, CONFIG: then `a` serves."""
    box.exec(["systemctl", "stop", "sparkd", "sparkd-gateway"])
    box.exec(["sh", "-c", "systemctl stop 'sparkd-engine@*'; systemctl reset-failed; "
              f"rm -f /var/lib/sparkd/state.toml* {ACCEPTED}"])
    box.exec(["tee", "/etc/sparkd.toml"], input=CONFIG, quiet=True)
    box.exec(["systemctl", "start", "sparkd", "sparkd-gateway"])
    wait_for("a to serve and become last good",
             lambda: serving(box, "a") and (status(box) or {}).get("last_good_model") == "a",
             timeout=90)


def cut_and_boot(box: Container) -> None:
    box.power_cut()
    box.boot()
    box.wait_running()


def chat(box: Container, model: str) -> int:
    """A chat completion through the gateway: its HTTP status."""
    body = json.dumps({"model": model, "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 4})
    res = box.exec(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}", "-H",
                    "Content-Type: application/json", "-d", body,
                    "http://127.0.0.1:8000/v1/chat/completions"], check=False)
    return int(res.stdout or 0)


def active_engines(box: Container) -> list[str]:
    out = box.exec(["systemctl", "list-units", "--plain", "--no-legend", "--state=active",
                    "sparkd-engine@*"]).stdout
    return sorted(line.split()[0] for line in out.splitlines() if line.strip())


def engine_log(box: Container, model: str) -> str:
    return box.exec(["journalctl", "-b", "-u", f"sparkd-engine@{model}.service", "-o", "cat",
                     "--no-pager"]).stdout


def state_file(box: Container) -> str:
    return box.exec(["cat", "/var/lib/sparkd/state.toml"]).stdout


def test_a_cut_while_serving_comes_back_serving_through_the_gateway(
    container: Container,
) -> None:
    box = container
    fresh(box)
    assert chat(box, "a") == 200
    cut_and_boot(box)
    wait_for("a chat completion through the gateway after the cut",
             lambda: chat(box, "a") == 200, timeout=60)
    assert serving(box, "a")
    assert active_engines(box) == ["sparkd-engine@a.service"]
    assert prop(box, "sparkd.service", "NRestarts") == "0"
    assert prop(box, "sparkd-gateway.service", "NRestarts") == "0"


def test_a_cut_in_the_middle_of_a_swap_is_finished_or_rolled_back(container: Container) -> None:
    box = container
    fresh(box)
    # b loads for 6 s: the cut comes while its unit is starting, after the flip to b was
    # recorded and a was stopped.
    box.exec(["sparkctl", "swap", "b", "--no-wait"])
    wait_for("the swap to b to be in its start step",
             lambda: prop(box, "sparkd-engine@b.service", "ActiveState") == "activating"
             and 'swap_to = "b"' in state_file(box), timeout=30)
    # a stopped a moment ago: b's prestart waits for memory to settle (systemd says so).
    wait_for("b's prestart to settle", lambda: "prestart b: settle: MemAvailable"
             in engine_log(box, "b"), timeout=30)
    cut_and_boot(box)
    wait_for("a model to serve after the cut",
             lambda: serving(box, "b") or serving(box, "a"), timeout=90)
    s = status(box)
    assert s is not None
    served = s["active_model"]
    # Finished (b) or rolled back (a): either way one engine, the state says so, no swap left.
    assert active_engines(box) == [f"sparkd-engine@{served}.service"]
    state = state_file(box)
    assert f'desired_model = "{served}"' in state
    assert "swap_to" not in state
    resumed = box.exec(["journalctl", "-b", "SPARKD_EVENT=swap_resumed", "-o", "cat",
                        "--no-pager"]).stdout
    assert "resuming the swap to b" in resumed
    # The first start of this boot: no engine stopped, nothing gives memory back.
    assert "prestart b: settle: skipped (no sparkd engine stopped" in engine_log(box, "b")
    wait_for("a chat completion through the gateway", lambda: chat(box, served) == 200,
             timeout=30)


# A hub on loopback inside the container (tests/integration/hubserver.py, on the package's
# own aiohttp), its body requests appended to LOG as JSON lines. SHARD trickles at 1 MiB/s on
# the first boot; after the cut the hub is started again with no fault.
HUB = r"""
import dataclasses, json, sys, threading, time
sys.path[:0] = ["/usr/lib/sparkd/python", "/src/tests/integration"]
from hubserver import FakeHub, slow
hub = FakeHub()
files = {"config.json": b'{"model_type": "tiny"}',
         "model.safetensors": bytes(range(256)) * (6 * 4096)}
hub.add_repo("org/tiny", files)
if sys.argv[1] == "slow":
    hub.inject("model.safetensors", slow(1 << 20))
hub.start()
with open("/run/hub.endpoint", "w") as f:
    f.write(hub.endpoint)
while True:
    time.sleep(0.2)
    with hub._lock:
        rows = [dataclasses.asdict(e) for e in hub.log]
    with open("/run/hub.log.tmp", "w") as f:
        json.dump(rows, f)
    import os; os.replace("/run/hub.log.tmp", "/run/hub.log")
"""
MODEL_DIR = "/var/lib/sparkd/models/tiny"
SHARD_SIZE = 6 * MIB


def start_hub(box: Container, mode: str) -> str:
    box.exec(["tee", "/run/hub.py"], input=HUB, quiet=True)
    box.exec(["rm", "-f", "/run/hub.endpoint", "/run/hub.log"])
    box.exec(["systemd-run", "--unit=fake-hub", "--collect", "python3", "/run/hub.py", mode])
    wait_for("the fake hub", lambda: box.exec(["test", "-s", "/run/hub.endpoint"],
                                              check=False).returncode == 0, timeout=20)
    return box.exec(["cat", "/run/hub.endpoint"]).stdout.strip()


def hub_bodies(box: Container, file: str) -> list[tuple[int | None, int]]:
    """(Range start, status) of each GET that carried the file's bytes."""
    rows = json.loads(box.exec(["cat", "/run/hub.log"]).stdout)
    return [(r["range_start"], r["status"]) for r in rows
            if r["file"] == file and r["method"] == "GET"
            and (r["route"] == "cdn" or (r["route"] == "resolve" and r["status"] != 302))]


def part_size(box: Container) -> int:
    res = box.exec(["stat", "-c", "%s", f"{MODEL_DIR}/.model.safetensors.part"], check=False)
    return int(res.stdout) if res.returncode == 0 else 0


def test_a_cut_in_the_middle_of_a_pull_resumes_and_never_keeps_a_wrong_file(
    container: Container,
) -> None:
    box = container
    fresh(box)
    endpoint = start_hub(box, "slow")
    hub_env = {"HF_ENDPOINT": endpoint, "HF_TOKEN": "hf_test", "HF_HUB_DISABLE_TELEMETRY": "1"}
    box.exec(["systemd-run", "--unit=pull-tiny", "--collect",
              *[f"--setenv={k}={v}" for k, v in hub_env.items()], "sparkctl", "pull", "tiny",
              "--json"])
    wait_for("the pull to write 1 MiB of the shard", lambda: part_size(box) >= MIB, timeout=30)
    cut_and_boot(box)

    # The next boot: the partial file is there, the shard is not in place, and nothing
    # passes for the model: verify fails, naming the missing file.
    on_disk = part_size(box)
    assert MIB <= on_disk < SHARD_SIZE
    assert box.exec(["test", "-e", f"{MODEL_DIR}/model.safetensors"],
                    check=False).returncode != 0
    verify = box.exec(["sparkctl", "verify", "tiny"], check=False)
    assert verify.returncode != 0, verify.stdout
    wait_for("a to serve after the cut", lambda: serving(box, "a"), timeout=90)

    # The pull again (the hub is back, on another port): it resumes from the bytes on disk.
    endpoint = start_hub(box, "fast")
    hub_env["HF_ENDPOINT"] = endpoint
    pull = box.exec(["sparkctl", "pull", "tiny", "--json"], env=hub_env, timeout=90)
    result = json.loads(pull.stdout.splitlines()[-1])
    assert result["event"] == "result" and result["ok"], pull.stdout
    time.sleep(0.5)  # the hub's log is written every 0.2 s
    assert hub_bodies(box, "model.safetensors") == [(on_disk, 206)]
    expected = box.exec(["python3", "-c", "import hashlib; print(hashlib.sha256("
                         "bytes(range(256)) * (6 * 4096)).hexdigest())"]).stdout.split()[0]
    got = box.exec(["sha256sum", f"{MODEL_DIR}/model.safetensors"]).stdout.split()[0]
    assert got == expected
    assert box.exec(["sh", "-c", f"ls -a {shlex.quote(MODEL_DIR)} | grep -c part || true"]
                    ).stdout.strip() == "0"
    assert box.exec(["sparkctl", "verify", "tiny"]).returncode == 0
    box.exec(["systemctl", "stop", "fake-hub"])


# The hub as a unit that starts at every boot before sparkd (Type=notify once it listens), in
# the mode /var/lib/hub.mode names; it writes its endpoint where sparkd's drop-in reads it.
HUB_AT_BOOT = HUB.replace(
    'if sys.argv[1] == "slow":',
    'if open("/var/lib/hub.mode").read().strip() == "slow":',
).replace(
    "hub.start()\n",
    "hub.start()\n"
    "open('/var/lib/hub.env', 'w').write(f'HF_ENDPOINT={hub.endpoint}\\nHF_TOKEN=hf_test\\n')\n"
    "import os, socket\n"
    "s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)\n"
    "s.sendto(b'READY=1', os.environ['NOTIFY_SOCKET'])\n",
)
HUB_UNIT = """[Unit]
Description=fake hub (test)
Before=sparkd.service

[Service]
Type=notify
NotifyAccess=main
ExecStart=/usr/bin/python3 /var/lib/hub.py

[Install]
WantedBy=multi-user.target
"""
HUB_DROP_IN = "[Service]\nEnvironmentFile=-/var/lib/hub.env\n"


def journal_events(box: Container, name: str) -> list[dict[str, str]]:
    out = box.exec(["journalctl", "-b", "-o", "json", "--no-pager", f"SPARKD_EVENT={name}"],
                   check=False, quiet=True).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_a_cut_in_the_middle_of_a_pull_of_another_model_is_resumed_at_the_next_boot(
    container: Container,
) -> None:
    """Issue 12: after the unclean boot, the partial download of `tiny` (not the desired
    model) is resumed in the background from its bytes on disk while `a` serves."""
    box = container
    fresh(box)
    box.exec(["tee", "/var/lib/hub.py"], input=HUB_AT_BOOT, quiet=True)
    box.exec(["tee", "/etc/systemd/system/fake-hub-boot.service"], input=HUB_UNIT, quiet=True)
    box.exec(["mkdir", "-p", "/etc/systemd/system/sparkd.service.d"])
    box.exec(["tee", "/etc/systemd/system/sparkd.service.d/hub.conf"], input=HUB_DROP_IN,
             quiet=True)
    box.exec(["sh", "-c", "echo slow > /var/lib/hub.mode; rm -rf /var/lib/sparkd/models/tiny"
              " /var/lib/sparkd/manifests/tiny.json; systemctl daemon-reload; "
              "systemctl enable --now fake-hub-boot.service"])
    env = dict(line.split("=", 1) for line in
               box.exec(["cat", "/var/lib/hub.env"]).stdout.split())
    box.exec(["systemd-run", "--unit=pull-tiny-2", "--collect",
              *[f"--setenv={k}={v}" for k, v in env.items()], "sparkctl", "pull", "tiny",
              "--json"])
    wait_for("the pull to write 1 MiB of the shard", lambda: part_size(box) >= MIB, timeout=30)
    box.exec(["sh", "-c", "echo fast > /var/lib/hub.mode"])
    try:
        cut_and_boot(box)
        wait_for("tiny's download to be resumed",
                 lambda: bool(journal_events(box, "boot_resume_done")), timeout=90)
        [done] = journal_events(box, "boot_resume_done")
        assert done["SPARKD_MODEL"] == "tiny" and int(done["SPARKD_DURATION_MS"]) >= 0
        assert journal_events(box, "boot_resume_found")
        # Behind the serving model: sparkd was READY first, and `a` serves.
        ready = journal_events(box, "daemon_ready")
        assert ready and int(ready[0]["__REALTIME_TIMESTAMP"]) <= int(
            journal_events(box, "boot_resume_found")[0]["__REALTIME_TIMESTAMP"])
        wait_for("a to serve", lambda: serving(box, "a"), timeout=60)
        time.sleep(0.5)  # the hub's log is written every 0.2 s
        # Resumed from the bytes on disk, not fetched again from the start.
        [(start, code)] = hub_bodies(box, "model.safetensors")
        assert code == 206 and start is not None and start >= MIB, (start, code)
        expected = box.exec(["python3", "-c", "import hashlib; print(hashlib.sha256("
                             "bytes(range(256)) * (6 * 4096)).hexdigest())"]).stdout.split()[0]
        got = box.exec(["sha256sum", f"{MODEL_DIR}/model.safetensors"]).stdout.split()[0]
        assert got == expected
        assert part_size(box) == 0
        assert box.exec(["sparkctl", "verify", "tiny"]).returncode == 0
    finally:
        box.exec(["sh", "-c", "systemctl disable --now fake-hub-boot.service; rm -f "
                  "/etc/systemd/system/sparkd.service.d/hub.conf; systemctl daemon-reload"],
                 check=False)
