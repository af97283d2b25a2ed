"""The desktop ladder in a booted systemd with the .deb (issue 13): SetUnitProperties through
sparkd's pystemd adapter really changes a unit's CPUWeight/IOWeight (systemctl show), the
lateness probe unit runs in user.slice and reports, and the measured contrast: a stand-in for
the desktop in user.slice measures its own frame lateness while a simulated engine burns every
CPU, with the ladder on and with it off.

The stand-in does a frame's work (FRAME_WORK_S of CPU every FRAME_S) and measures how late
each frame ends: a bare sleeper is not the desktop's problem under a CPU burner (measured on
this kernel: its p99 moved by less than the host's own noise). Desktop presence is forced with
`desktop_presence = "present"` (no logind session in the container)."""

from __future__ import annotations

import json
import os

import pytest
from checks import serving, wait_for
from harness import Container

pytestmark = pytest.mark.system

PY = "import sys; sys.path.insert(0, '/usr/lib/sparkd/python'); "
BURN = 8 * (os.cpu_count() or 2)  # processes: far more than cores, whatever the nice level
# The stand-in's processes: together they want more than half of the CPUs, so that with
# weights equal (each unit half of its slice's share) they fall behind, and with the engine at
# CPUWeight=1 they do not.
STAND_IN_PROCS = max(2, os.cpu_count() or 2)
THRESHOLD_MS = 20.0  # the default daemon.desktop_lateness_p99_ms

CONFIG = """
[daemon]
default_model = "burn"
memory_reserve_gib = 0
health_interval_s = 1
settle_timeout_s = 2
desktop_presence = "present"
desktop_ladder = {ladder}
desktop_over_s = 2
desktop_psi_cpu_some_pct = 50
desktop_lateness_p99_ms = {threshold}

[models.burn]
engine = "sim"
port = 8101
load_timeout_s = 60
args = ["--load-seconds", "1", "--weights-mib", "8", "--burn-processes", "{burn}"]
"""

# A desktop's frame: FRAME_WORK_S of CPU every FRAME_S; lateness is how far past its period
# each frame ended. Prints the p99 and the median in ms.
FRAME_S, FRAME_WORK_S, FRAMES = 0.02, 0.012, 300
STAND_IN = f"""
import time
late = []
start = time.monotonic()
for i in range({FRAMES}):
    due = start + (i + 1) * {FRAME_S}
    t0 = time.thread_time()
    while time.thread_time() - t0 < {FRAME_WORK_S}:
        pass
    end = time.monotonic()
    late.append(max(0.0, end - due))
    if end < due:
        time.sleep(due - end)
    else:
        start += end - due  # a late frame does not make every later one late
late.sort()
print(late[int(0.99 * len(late)) - 1] * 1000, late[len(late) // 2] * 1000)
"""


def events(box: Container, name: str) -> list[dict[str, str]]:
    out = box.exec(["journalctl", "-b", f"SPARKD_EVENT={name}", "-o", "json",
                    "--no-pager"]).stdout
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def restart_with(box: Container, config: str) -> None:
    box.exec(["systemctl", "stop", "sparkd", "sparkd-engine@*"])
    box.exec(["tee", "/etc/sparkd.toml"], input=config)
    box.exec(["rm", "-f", "/var/lib/sparkd/state.toml"])
    box.exec(["journalctl", "--rotate"], check=False)
    box.exec(["systemctl", "start", "sparkd"])


def stand_in_p99(box: Container, slice_: str) -> tuple[float, float]:
    """The worst p99 and median of the stand-in's processes (one unit in `slice_`)."""
    box.exec(["tee", "/root/stand_in.py"], input=STAND_IN)
    procs = " & ".join(["python3 /root/stand_in.py"] * STAND_IN_PROCS) + " & wait"
    out = box.exec(["systemd-run", "--wait", "--pipe", "--quiet", f"--slice={slice_}",
                    "sh", "-c", procs], timeout=120).stdout.split()
    pairs = [(float(a), float(b)) for a, b in zip(out[::2], out[1::2], strict=True)]
    return max(p for p, _ in pairs), max(m for _, m in pairs)


def test_set_unit_properties_changes_the_weights(container: Container) -> None:
    box = container
    # A unit file under /run/systemd/system, as sparkd's engine units are (not transient).
    box.exec(["tee", "/run/systemd/system/weighted.service"],
             input="[Service]\nExecStart=/usr/bin/sleep 600\nCPUWeight=50\nIOWeight=50\n")
    box.exec(["systemctl", "daemon-reload"])
    box.exec(["systemctl", "start", "weighted.service"])
    try:
        code = (PY + "from sparkd.systemd.bus import PystemdManager; "
                "from sparkd.systemd.manager import ResourceWeights; m = PystemdManager(); "
                "before = m.resource_weights('weighted.service'); "
                "m.set_resource_weights('weighted.service', ResourceWeights(3, 7, "
                "before.memory_high)); "
                "print(before.cpu_weight, before.io_weight, before.memory_high)")
        before = box.exec(["python3", "-c", code]).stdout.split()
        assert before == ["50", "50", str((1 << 64) - 1)]
        shown = box.exec(["systemctl", "show", "-p", "CPUWeight", "-p", "IOWeight",
                          "weighted.service"]).stdout.split()
        assert sorted(shown) == ["CPUWeight=3", "IOWeight=7"]
        # runtime=true: a drop-in under /run (gone at the next boot), none under /etc
        assert "CPUWeight=3" in box.exec(["sh", "-c", "cat /run/systemd/system.control/"
                                          "weighted.service.d/*"]).stdout
        assert box.exec(["test", "-e", "/etc/systemd/system.control/weighted.service.d"],
                        check=False).returncode != 0
        restore = (PY + "from sparkd.systemd.bus import PystemdManager; "
                   "from sparkd.systemd.manager import ResourceWeights, UNSET; "
                   "PystemdManager().set_resource_weights('weighted.service', "
                   "ResourceWeights(50, UNSET, UNSET))")
        box.exec(["python3", "-c", restore])
        shown = box.exec(["systemctl", "show", "-p", "CPUWeight", "-p", "IOWeight",
                          "weighted.service"]).stdout.splitlines()
        assert sorted(shown) == ["CPUWeight=50", "IOWeight=[not set]"]
    finally:
        box.exec(["systemctl", "stop", "weighted.service"], check=False)
        box.exec(["rm", "-rf", "/run/systemd/system/weighted.service",
                  "/run/systemd/system.control/weighted.service.d"], check=False)
        box.exec(["systemctl", "daemon-reload"], check=False)


def test_the_lateness_probe_runs_in_user_slice_and_reports(container: Container) -> None:
    box = container
    box.wait_unit_active("sparkd-lateness.service")
    assert box.exec(["systemctl", "show", "-P", "Slice",
                     "sparkd-lateness.service"]).stdout.strip() == "user.slice"
    wait_for("a lateness report", lambda: box.exec(
        ["test", "-s", "/run/sparkd-lateness/lateness"], check=False).returncode == 0,
        timeout=30)
    report = json.loads(box.exec(["cat", "/run/sparkd-lateness/lateness"]).stdout)
    assert report["period_ms"] == 50 and report["samples"] > 0
    assert report["p99_ms"] <= report["max_ms"]


def test_the_ladder_keeps_the_desktop_on_time_and_off_it_does_not(
        container: Container) -> None:
    """The measured contrast (issue 13), on the weights step alone. The stand-in is a unit in
    system.slice, beside the engine: cgroup weights divide a parent's share among its
    children, so that is where the engine unit's CPUWeight= acts (a desktop session in
    user.slice gets user.slice's share whatever the engine's weight: measured and printed
    below, not asserted). Off: the ladder empty, the engine's weights set equal to the
    stand-in's (100). On: the ladder `["weights"]`, 2 s over PSI cpu some 50 %."""
    box = container
    cgroup = box.exec(["sh", "-c", "stat -fc %T /sys/fs/cgroup; ls /sys/fs/cgroup"]).stdout
    # Off.
    restart_with(box, CONFIG.format(ladder="[]", threshold=THRESHOLD_MS, burn=BURN))
    wait_for("burn to serve", lambda: serving(box, "burn"), timeout=90)
    box.exec(["systemctl", "set-property", "--runtime", "sparkd-engine@burn.service",
              "CPUWeight=100", "IOWeight=100"])
    # Whether the engine unit's CPUWeight= reaches the kernel here at all.
    cpu_control = box.exec(["sh", "-c", "cg=$(systemctl show -P ControlGroup "
                            "sparkd-engine@burn.service); for f in /sys/fs/cgroup$cg/cpu.weight "
                            "/sys/fs/cgroup/unified$cg/cpu.weight /sys/fs/cgroup/cpu$cg/cpu.shares;"
                            " do [ -e $f ] && echo cpu-weight-file $f; done; echo cgroup $cg"]
                           ).stdout
    off_p99, off_median = stand_in_p99(box, "system.slice")
    user_p99, user_median = stand_in_p99(box, "user.slice")
    assert not events(box, "desktop_ladder")
    # On.
    restart_with(box, CONFIG.format(ladder='["weights"]', threshold=THRESHOLD_MS, burn=BURN))
    wait_for("the ladder to lower the burning engine's weights",
             lambda: bool(events(box, "desktop_ladder")), timeout=120)
    shown = box.exec(["systemctl", "show", "-P", "CPUWeight", "sparkd-engine@burn.service"])
    assert shown.stdout.strip() == "1"
    on_p99, on_median = stand_in_p99(box, "system.slice")
    print(f"desktop contrast: system.slice stand-in off p99 {off_p99:.1f} ms (median "
          f"{off_median:.1f}), on p99 {on_p99:.1f} ms (median {on_median:.1f}); user.slice "
          f"stand-in with the ladder off p99 {user_p99:.1f} ms (median {user_median:.1f}); "
          f"cgroup {cgroup!r}; load {os.getloadavg()}")
    if "cpu-weight-file" not in cpu_control:
        pytest.fail("CPUWeight= cannot act in this container: no cpu.weight (cgroup v2) or "
                    "cpu.shares (v1) file for the engine's cgroup (systemd-nspawn mounts a "
                    "cgroup v1 host's cpu hierarchy read-only); the contrast above is not the "
                    f"ladder's: {cpu_control!r}", pytrace=False)
    # The contrast, not absolute figures (the machine is shared; its other load reaches the
    # stand-in whatever the ladder does): the form first, else half the lateness.
    assert (on_p99 < THRESHOLD_MS <= off_p99) or (on_p99 <= off_p99 / 2
                                                   and on_median <= off_median / 2)
    box.exec(["systemctl", "stop", "sparkd"])
