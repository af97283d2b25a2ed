"""Code inside an engine cannot drive sparkd (issue 10, item 4), in a booted systemd.

A `trust_remote_code` model runs its own Python inside the engine unit. Before issue 10 the
engines ran as user and group `sparkd`, the control socket admitted group `sparkd`, and engine
units left `/run/sparkd` visible: such code could swap, unload and reload. Here a simulated
engine model's command is a probe that, from inside the engine unit's own sandbox (its user,
groups, mount namespace, seccomp filter, everything systemd gives it), tries the control socket
and prints what happened, then becomes the real simulated engine. Then each layer is shown on
its own: the engine user outside the sandbox (the group), root in the engine's mount namespace
(the hidden directory), and root inside the engine unit's cgroup (the daemon's own check).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from checks import prop, wait_for
from harness import Container

pytestmark = pytest.mark.system

PROBE = "/usr/local/bin/sparkd-engine-probe"
UNIT = "sparkd-engine@probe.service"
SOCKET = "/run/sparkd/control.sock"

# Prints one line `SPARKD-PROBE {json}` saying who it is and what the control socket said;
# with arguments other than --only it then execs the real simulated engine with them.
PROBE_SOURCE = f"""#!/usr/bin/python3 -I
import json, os, socket, sys

out = {{"uid": os.getuid(), "gid": os.getgid(), "groups": sorted(os.getgroups())}}
try:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(5)
    s.connect({SOCKET!r})
    try:  # a refusal may come (and the socket close) before the request is read
        s.sendall(b'{{"method": "status"}}\\n')
    except (BrokenPipeError, ConnectionResetError):
        pass
    out["reply"] = json.loads(s.makefile("rb").readline())
except OSError as exc:
    out["errno"] = exc.errno
    out["error"] = str(exc)
print("SPARKD-PROBE " + json.dumps(out), flush=True)
if sys.argv[1:] != ["--only"]:
    os.execv("/usr/bin/sparkd", ["sparkd", *sys.argv[1:]])
"""

PROBE_MODEL = """
[models.probe]
engine = "sim"
port = 8150
memory_gib = 0.1
load_timeout_s = 60
binary = "/usr/local/bin/sparkd-engine-probe"
args = ["--load-seconds", "0", "--resident-mib", "16", "--weights-mib", "8"]
"""


def probe_result(text: str) -> dict[str, Any]:
    lines = [line for line in text.splitlines() if line.startswith("SPARKD-PROBE ")]
    assert lines, f"the probe printed nothing:\n{text}"
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("SPARKD-PROBE "))
    return result


def ids(box: Container, *args: str) -> int:
    return int(box.exec(["id", *args]).stdout.strip())


@pytest.fixture(scope="module")
def probing(container: Container) -> Container:
    container.exec(["install", "-m", "0755", "/dev/stdin", PROBE], input=PROBE_SOURCE)
    container.sh(f"cat >> /etc/sparkd.toml <<'EOF'\n{PROBE_MODEL}EOF")
    container.exec(["sparkd", "check-config"])
    container.exec(["systemctl", "reload", "sparkd"])
    wait_for("sparkd to render the probe's unit",
             lambda: container.exec(["test", "-e", f"/run/systemd/system/{UNIT}"],
                                    check=False).returncode == 0)
    container.exec(["systemctl", "start", UNIT], timeout=120)
    return container


def test_the_probe_itself_reaches_the_socket_as_root(probing: Container) -> None:
    # The probe can tell: run as root outside any engine, sparkd answers it.
    result = probe_result(probing.exec([PROBE, "--only"]).stdout)
    assert result["uid"] == 0 and result["reply"]["ok"] is True


def test_code_inside_an_engine_unit_cannot_reach_the_control_socket(
    probing: Container,
) -> None:
    log = probing.exec(["journalctl", "-b", "-u", UNIT, "--no-pager", "-o", "cat"]).stdout
    result = probe_result(log)
    assert "reply" not in result, f"the engine reached sparkd: {result}"
    engine_uid = ids(probing, "-u", "sparkd-engine")
    control_gid = int(probing.exec(["getent", "group", "sparkd"]).stdout.split(":")[2])
    assert result["uid"] == engine_uid
    assert control_gid not in [result["gid"], *result["groups"]]
    # The directory is hidden (an empty, inaccessible directory over /run/sparkd).
    assert result["errno"] in (2, 13), result
    assert prop(probing, UNIT, "ActiveState") == "active"  # and the engine itself serves


def test_the_engine_user_is_refused_by_the_socket_outside_the_sandbox(
    probing: Container,
) -> None:
    # The group alone keeps it out: mode 0660 root:sparkd, and sparkd-engine is no member.
    out = probing.exec(["setpriv", "--reuid=sparkd-engine", "--regid=sparkd-engine",
                        "--init-groups", PROBE, "--only"]).stdout
    result = probe_result(out)
    assert result["uid"] == ids(probing, "-u", "sparkd-engine")
    assert "reply" not in result and result["errno"] == 13, result


def test_the_engine_mount_namespace_has_no_control_socket(probing: Container) -> None:
    # nsenter into the running engine's mount namespace: even root finds no socket there.
    pid = prop(probing, UNIT, "MainPID")
    assert pid != "0"
    seen = probing.exec(["nsenter", "-t", pid, "-m", "ls", "-A", "/run/sparkd"], check=False)
    assert "control.sock" not in seen.stdout
    result = probe_result(probing.exec(["nsenter", "-t", pid, "-m", PROBE, "--only"]).stdout)
    assert "reply" not in result, result


def test_sparkd_refuses_a_process_in_an_engine_units_cgroup(probing: Container) -> None:
    # Root, in the host's mount namespace, but moved into the engine unit's cgroup: sparkd
    # looks at the peer's cgroup and refuses it whatever its user.
    # The unit's cgroup directories, in whichever hierarchies the host mounts (cgroup2 only,
    # or hybrid with name=systemd, as the test host has).
    found = probing.exec(["find", "/sys/fs/cgroup", "-maxdepth", "6", "-type", "d", "-name",
                          UNIT]).stdout.split()
    assert found, f"no cgroup directory for {UNIT}"
    moves = " && ".join(f"echo $$ > '{d}/cgroup.procs'" for d in found)
    out = probing.exec(["/bin/sh", "-c", f'{moves} && exec "$1" --only', "sh", PROBE])
    result = probe_result(out.stdout)
    assert "reply" in result, result
    reply = result["reply"]
    assert reply["ok"] is False
    assert reply["error"]["code"] == "permission-denied"
    assert f"runs in the engine unit {UNIT}" in reply["error"]["message"]
