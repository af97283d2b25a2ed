"""Tests of the container harness itself: none of them needs sparkd's daemon to work."""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from harness import (
    LONG_LIVED_ENV,
    NSPAWN_STATE,
    ContainerFactory,
    ExecError,
    missing_prerequisites,
    reap_stale_containers,
    units_to_mask,
)

pytestmark = pytest.mark.system


def test_prerequisites_are_met() -> None:
    assert missing_prerequisites() == ()


def test_boot_reaches_running_with_systemd_as_pid_1(make_container: ContainerFactory) -> None:
    box = make_container()
    state = box.exec(["systemctl", "is-system-running"], check=False).stdout.strip()
    assert state in ("running", "degraded")
    assert box.exec(["cat", "/proc/1/comm"]).stdout.strip() == "systemd"
    assert box.exec(["hostname"]).stdout.strip() == box.name
    host_machine_id = Path("/etc/machine-id").read_text().strip()
    assert box.exec(["cat", "/etc/machine-id"]).stdout.strip() != host_machine_id
    # Only loopback: --private-network.
    links = box.exec(["ip", "-o", "link", "show"]).stdout.splitlines()
    assert [line.split(":")[1].strip() for line in links] == ["lo"]


def test_exec_environment_exit_status_and_timeout(make_container: ContainerFactory) -> None:
    box = make_container()
    env = box.exec(["env"], env={"SPARKD_PROBE": "42"}).stdout.splitlines()
    assert "SPARKD_PROBE=42" in env
    assert "HOME=/root" in env
    # The host's environment stays outside (the harness's own marker included).
    assert not any(line.startswith((LONG_LIVED_ENV, "PYTEST_")) for line in env)

    assert box.exec(["sh", "-c", "exit 3"], check=False).returncode == 3
    with pytest.raises(ExecError) as failure:
        box.exec(["sh", "-c", "echo to-stderr >&2; exit 4"])
    assert failure.value.returncode == 4
    assert "to-stderr" in str(failure.value)
    assert box.sh("read line; echo got-$line", input="x\n").stdout == "got-x\n"

    start = time.monotonic()
    with pytest.raises(subprocess.TimeoutExpired):
        box.exec(["sleep", "300"], timeout=1)
    assert time.monotonic() - start < 10
    # The command was killed inside the container too, not only nsenter.
    assert box.exec(["pgrep", "-x", "sleep"], check=False).returncode == 1


def test_containers_side_by_side_do_not_share_cgroups(make_container: ContainerFactory) -> None:
    first, second = make_container(), make_container()
    assert (
        Path(f"/proc/{first.pid}/cgroup").read_text()
        != Path(f"/proc/{second.pid}/cgroup").read_text()
    )
    for box in (first, second):
        box.exec(["systemd-run", "--unit=harness-probe", "sleep", "600"])
    first.exec(["systemctl", "kill", "--signal=SIGKILL", "harness-probe.service"])
    second.exec(["systemctl", "is-active", "harness-probe.service"])


def test_api_filesystems_are_writable(make_container: ContainerFactory) -> None:
    box = make_container()
    box.sh("sync; echo 3 > /proc/sys/vm/drop_caches")
    assert box.exec(["test", "-w", "/proc/sys/vm/drop_caches"]).returncode == 0


def test_bind_mounts_bring_the_checkout_and_the_package_dir(
    make_container: ContainerFactory, deb_path: Path
) -> None:
    box = make_container()
    assert box.exec(["test", "-f", "/src/pyproject.toml"]).returncode == 0
    assert box.exec(["test", "-f", f"/mnt/deb/{deb_path.name}"]).returncode == 0
    # Read-only: a test cannot scribble on the checkout through /src.
    assert box.exec(["touch", "/src/written-by-container"], check=False).returncode != 0


def test_power_cut_then_next_boot(make_container: ContainerFactory) -> None:
    box = make_container()
    first_boot = box.boot_id()
    box.sh("echo before-the-cut > /var/lib/harness-probe; sync")
    box.sh("nohup sleep 600 >/dev/null 2>&1 &")
    old_pid1 = box.pid

    box.power_cut()
    assert not box.running
    # Reaped, not left as a zombie on the host.
    assert not Path(f"/proc/{old_pid1}").exists()

    box.boot()
    box.wait_running()
    assert box.boot_id() != first_boot
    assert box.exec(["cat", "/var/lib/harness-probe"]).stdout == "before-the-cut\n"
    # Nothing of the previous boot survived it.
    assert box.exec(["pgrep", "-x", "sleep"], check=False).returncode == 1
    # The journal is persistent: the boot before the cut can be read after it.
    boots = box.exec(["journalctl", "--list-boots", "--no-pager"]).stdout.splitlines()
    assert len([line for line in boots if line.strip()]) >= 2, boots


def test_clean_stop_then_boot(make_container: ContainerFactory) -> None:
    box = make_container()
    first_boot = box.boot_id()
    box.stop(timeout=60)
    assert not box.running
    box.boot()
    box.wait_running()
    assert box.boot_id() != first_boot
    previous = box.journal(boot="-1", lines=400)
    assert "Reached target" in previous and "halt" in previous.lower(), previous[-2000:]


def test_cleanup_leaves_nothing_behind(make_container: ContainerFactory) -> None:
    box = make_container()
    box.sh("echo x > /var/lib/harness-probe")
    base, name = box.base, box.name
    assert base is not None
    box.cleanup()
    box.cleanup()  # a second call is harmless
    assert not base.exists()
    assert name not in Path("/proc/self/mountinfo").read_text()
    assert not (NSPAWN_STATE / "propagate" / name).exists()
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            assert f"{LONG_LIVED_ENV}={name}".encode() not in environ.read_bytes()
        except OSError:
            continue


def test_reap_stale_containers_after_a_killed_run() -> None:
    """A test session killed before its cleanup (a CI timeout) leaves an orphaned nspawn and
    its mounts; the next session's reap_stale_containers() removes them."""
    owner = subprocess.Popen(
        [sys.executable, "-c", ORPHAN_MAKER],
        cwd=Path(__file__).parent,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert owner.stdout is not None
    name = owner.stdout.readline().strip()
    owner.kill()
    owner.wait()
    owner.stdout.close()
    assert name.startswith("sparkd-test-"), name
    assert name in Path("/proc/self/mountinfo").read_text()

    reaped = reap_stale_containers()
    assert any(name in entry for entry in reaped), reaped
    assert name not in Path("/proc/self/mountinfo").read_text()
    assert not list(Path(tempfile.gettempdir()).glob(f"{name}-*"))


ORPHAN_MAKER = """
import time
from harness import Container
box = Container()
box.boot()
box.wait_running()
print(box.name, flush=True)
time.sleep(600)
"""


def test_deb_installs_and_its_commands_run(
    make_container: ContainerFactory, deb_path: Path
) -> None:
    box = make_container()
    # sparkd.service is not waited for: this test must not depend on the daemon.
    box.install_deb(deb_path.name, wait_active=False)
    assert "Usage" in box.exec(["sparkctl", "--help"]).stdout
    assert "Usage" in box.exec(["sparkd", "--help"]).stdout
    assert "OK" in box.exec(["sparkd", "check-config"]).stdout
    # Installed for the system python, isolated from any environment.
    located = box.exec(
        [
            "/usr/bin/python3",
            "-I",
            "-c",
            "import sys; sys.path.insert(0, '/usr/lib/sparkd/python');"
            "import sparkd, pystemd; print(sparkd.__file__)",
        ]
    ).stdout.strip()
    assert located == "/usr/lib/sparkd/python/sparkd/__init__.py"
    # postinst byte-compiled it (the package ships no __pycache__; prerm removes them).
    box.exec(["test", "-d", "/usr/lib/sparkd/python/sparkd/__pycache__"])

    # Engines run as sparkd-engine, which is not in the control group sparkd (issue 10).
    assert box.exec(["getent", "passwd", "sparkd-engine"]).returncode == 0
    assert box.exec(["getent", "group", "sparkd"]).stdout.strip().split(":")[3] == (
        "sparkd-gateway")
    groups = box.exec(["id", "-nG", "sparkd-engine"]).stdout.split()
    assert groups == ["sparkd-engine"]
    owner = box.exec(["stat", "-c", "%U:%G %a", "/var/lib/sparkd/models"]).stdout.strip()
    assert owner == "root:root 755"
    home = box.exec(["stat", "-c", "%U:%G %a", "/var/lib/sparkd/home"]).stdout.strip()
    assert home == "sparkd-engine:sparkd-engine 750"
    assert box.exec(["systemctl", "is-enabled", "sparkd.service"]).stdout.strip() == "enabled"
    assert (
        box.exec(["dpkg-query", "-W", "-f", "${Conffiles}", "sparkd"])
        .stdout.strip()
        .startswith("/etc/sparkd.toml")
    )

    # An upgrade (here: the same version again) keeps an admin's `systemctl disable`.
    box.exec(["systemctl", "disable", "sparkd.service"])
    box.exec(["dpkg", "-i", f"/mnt/deb/{deb_path.name}"], timeout=120)
    enabled = box.exec(["systemctl", "is-enabled", "sparkd.service"], check=False)
    assert enabled.stdout.strip() == "disabled"

    box.exec(["dpkg", "--purge", "sparkd"], timeout=120)
    assert box.exec(["test", "-e", "/usr/bin/sparkd"], check=False).returncode != 0
    assert box.exec(["test", "-e", "/usr/lib/sparkd"], check=False).returncode != 0
    state = box.exec(["systemctl", "is-active", "sparkd.service"], check=False).stdout.strip()
    assert state in ("inactive", "unknown")


def test_units_to_mask_reads_what_the_host_enabled(tmp_path: Path) -> None:
    etc = tmp_path / "etc/systemd/system"
    for link in (
        "timers.target.wants/apt-daily.timer",
        "multi-user.target.wants/postgresql.service",
        "multi-user.target.wants/remote-fs.target",
        "multi-user.target.wants/dbus.service",
        "sockets.target.wants/docker.socket",
    ):
        (etc / link).parent.mkdir(parents=True, exist_ok=True)
        (etc / link).symlink_to("/dev/null")
    masked = units_to_mask(tmp_path)
    assert {"apt-daily.timer", "postgresql.service", "docker.socket"} <= set(masked)
    assert "remote-fs.target" not in masked
    assert "dbus.service" not in masked
    assert "console-getty.service" in masked
