"""A real systemd booted in a container, for the system test tier.

The recipe (shared/FACTS.md, systemd section): a tmpfs holds the upper and work directories
of an overlay whose lower directory is the host's `/`, so the container runs the host's own
binaries and nothing it writes reaches the host. `systemd-nspawn -b` boots it; commands run
inside through `nsenter` into the namespaces of its PID 1 (there is no machined, so no
`machinectl` or `systemd-run -M`).

    with Container(deb_dir=Path("build"), src_dir=repo) as box:
        box.boot()
        box.wait_running()
        box.install_deb()
        box.exec(["sparkctl", "status"])
        box.power_cut()          # every process of the container gets SIGKILL at once
        box.boot()               # the same overlay: the next boot, files kept
        box.wait_running()

Layout on the host, under one temporary directory per container:

    DIR/fs/{upper,work}   a tmpfs: everything the container ever wrote, across boots
    DIR/root              the overlay (lowerdir=/, or image=): the container's root
    DIR/nspawn.log        what systemd-nspawn and the container's console printed, all boots

What a power cut here does and does not do: it kills every process of the container at once
(nothing inside gets to run a line of code), so in-memory state, open connections and
half-done work are lost. It does not lose written data: the upper directory is a tmpfs on
the host, so a file written before the cut is there after it, synced or not. A test of torn
or lost writes must make them itself (truncate or corrupt the file between the cut and the
boot, through `host_path()`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import shlex
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType

log = logging.getLogger(__name__)
# INFO records reach pytest's log capture (and a failed test's report) even though the
# root logger stays at WARNING: propagation checks handler levels, not ancestors' levels.
log.setLevel(logging.INFO)

DEB_MOUNT = "/mnt/deb"
SRC_MOUNT = "/src"
# A child process whose environment carries this variable belongs to a fixture that
# outlives the test (here: a container's systemd-nspawn and everything under it); the leak
# check in tests/conftest.py leaves its process tree alone.
LONG_LIVED_ENV = "SPARKD_TEST_LONG_LIVED"

NSPAWN_STATE = Path("/run/systemd/nspawn")
#: The v1 controllers a container may get cgroups of its own in (Container(v1_controllers=)).
V1_CPU_CONTROLLERS = ("cpu", "cpuacct")
CONTAINER_ENV: Mapping[str, str] = {
    "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG": "C.UTF-8",
    "HOME": "/root",
    "TERM": "dumb",
    "SYSTEMD_PAGER": "",
    "SYSTEMD_COLORS": "0",
    "PAGER": "cat",
    "DEBIAN_FRONTEND": "noninteractive",
}

# Units that slow the boot down or make noise and have nothing to do with sparkd, on the
# developer image and on common CI images (Debian and Ubuntu servers, cloud VMs). Besides
# these, everything the host's admin or packages enabled under /etc/systemd/system is
# masked (see units_to_mask), except what sparkd talks to.
ALWAYS_MASKED = (
    "console-getty.service",
    "getty@tty1.service",
    "systemd-networkd-wait-online.service",
    "NetworkManager-wait-online.service",
    "systemd-timesyncd.service",
    "apt-daily.service",
    "apt-daily-upgrade.service",
    "unattended-upgrades.service",
    "man-db.service",
    "cloud-init-local.service",
    "cloud-init.service",
    "cloud-config.service",
    "cloud-final.service",
    "snapd.service",
    "snapd.socket",
    "snapd.seeded.service",
    "postgresql.service",
    "postgresql@.service",
)
NEVER_MASKED = frozenset(
    {
        "dbus.service",
        "dbus.socket",
        "dbus-broker.service",
        "systemd-journald.service",
        "systemd-journald.socket",
        "systemd-logind.service",
        "systemd-tmpfiles-setup.service",
        "systemd-sysusers.service",
        "sparkd.service",
        "sparkd-gateway.service",
    }
)


class ContainerError(RuntimeError):
    """The container did not do what the harness asked; the message says what it saw."""


class ExecError(subprocess.CalledProcessError):
    """A command inside the container failed; str() carries its output."""

    def __str__(self) -> str:
        parts = [f"{shlex.join(self.cmd)} exited with {self.returncode}"]
        for name, text in (("stdout", self.stdout), ("stderr", self.stderr)):
            if text:
                parts.append(f"--- {name} (last 4000 characters):\n{text[-4000:]}")
        return "\n".join(parts)


def _run(argv: Sequence[str], *, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
    """A host command (mount, umount); failure raises with its stderr."""
    result = subprocess.run(
        list(argv), capture_output=True, text=True, timeout=timeout, check=False
    )
    if result.returncode != 0:
        raise ContainerError(
            f"{shlex.join(argv)} exited with {result.returncode}: {result.stderr.strip()}"
        )
    return result


def _mount_points_under(path: Path) -> list[Path]:
    """Mount points at or under path in this mount namespace, deepest first."""
    found: list[Path] = []
    prefix = str(path)
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            # Field 5 is the mount point, with spaces and the like octal-escaped.
            point = line.split()[4].encode().decode("unicode_escape")
            if point == prefix or point.startswith(prefix + "/"):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def _unmount(path: Path) -> None:
    """Unmount path, retrying while it is busy, then detaching it lazily."""
    for _ in range(20):
        result = subprocess.run(
            ["umount", str(path)], capture_output=True, text=True, timeout=30, check=False
        )
        if result.returncode == 0 or path not in _mount_points_under(path):
            return
        time.sleep(0.1)
    log.warning("umount %s stays busy: detaching it (umount -l)", path)
    _run(["umount", "-l", str(path)])


def _trial_overlay() -> str | None:
    """Mount a tmpfs and an overlay of / the way Container does; None when that works."""
    base = Path(tempfile.mkdtemp(prefix="sparkd-overlay-check-"))
    try:
        fs, root = base / "fs", base / "root"
        fs.mkdir()
        root.mkdir()
        _run(["mount", "-t", "tmpfs", "-o", "size=16m", "sparkd-check", str(fs)])
        try:
            (fs / "upper").mkdir()
            (fs / "work").mkdir()
            options = f"lowerdir=/,upperdir={fs}/upper,workdir={fs}/work"
            _run(["mount", "-t", "overlay", "-o", options, "overlay", str(root)])
            _unmount(root)
        finally:
            _unmount(fs)
    except (ContainerError, OSError, subprocess.SubprocessError) as exc:
        return f"cannot mount an overlay of / on a tmpfs: {exc}"
    finally:
        if not _mount_points_under(base):
            shutil.rmtree(base, ignore_errors=True)
    return None


@functools.cache
def missing_prerequisites() -> tuple[str, ...]:
    """Why containers cannot be booted here: empty when they can."""
    problems: list[str] = []
    if os.geteuid() != 0:
        problems.append(f"the system tier must run as root (running as uid {os.geteuid()})")
    for tool, package in (
        ("systemd-nspawn", "systemd-container"),
        ("nsenter", "util-linux"),
        ("mount", "mount"),
        ("umount", "mount"),
    ):
        if shutil.which(tool) is None:
            problems.append(f"{tool} not found (apt-get install {package}; scripts/bootstrap.sh)")
    if not any(Path(p).exists() for p in ("/usr/lib/systemd/systemd", "/lib/systemd/systemd")):
        problems.append("systemd is not installed (apt-get install systemd)")
    try:
        filesystems = Path("/proc/filesystems").read_text()
    except OSError as exc:
        problems.append(f"cannot read /proc/filesystems: {exc}")
    else:
        if "overlay" not in filesystems.split():
            problems.append("the kernel has no overlay filesystem (modprobe overlay)")
    if not problems:
        trial = _trial_overlay()
        if trial is not None:
            problems.append(trial)
    return tuple(problems)


def _process_identity(pid: int) -> str | None:
    """pid and start time: a pid the kernel reused does not pass for its first owner."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return f"{pid} {stat.rpartition(')')[2].split()[19]}"


def _nspawn_processes() -> Iterator[tuple[int, int, str]]:
    """(pid, ppid, container name) of every harness-started systemd-nspawn."""
    marker = LONG_LIVED_ENV.encode() + b"="
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or _comm(int(entry)) != "systemd-nspawn":
            continue
        try:
            values = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            ppid = int(Path(f"/proc/{entry}/stat").read_text().rpartition(")")[2].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        for value in values:
            if value.startswith(marker):
                yield int(entry), ppid, value[len(marker) :].decode()


def reap_stale_containers() -> list[str]:
    """Clean up after harness containers whose owner died without cleanup() (a pytest
    killed by a CI timeout): their nspawn (orphaned to the host's PID 1), mounts, temporary
    directory, cgroups and nspawn entries. A container whose owner process still runs is left
    alone, whatever state it is in (this host may run several test sessions at once).
    Returns what it reaped."""
    bases = {
        b.name.rpartition("-")[0]: b for b in Path(tempfile.gettempdir()).glob("sparkd-test-*-*")
    }
    live: set[str] = set()
    for name, base in bases.items():
        with contextlib.suppress(OSError, ValueError):
            owner = (base / "owner").read_text().strip()
            if _process_identity(int(owner.split()[0])) == owner:
                live.add(name)
    reaped: list[str] = []
    for pid, ppid, name in list(_nspawn_processes()):
        if ppid != 1:
            live.add(name)  # its owner (the parent) still runs
        elif name not in live:
            for child in _children(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(child, signal.SIGKILL)
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            reaped.append(f"orphaned systemd-nspawn {pid} of {name}")
    deadline = time.monotonic() + 10.0
    for name, base in sorted(bases.items()):
        if name in live or not base.is_dir():
            continue
        while _mount_points_under(base) and time.monotonic() < deadline:
            for point in _mount_points_under(base):
                with contextlib.suppress(ContainerError, subprocess.SubprocessError):
                    _unmount(point)
        if _mount_points_under(base):
            log.warning("stale container %s: still mounted, left alone", base)
            continue
        shutil.rmtree(base, ignore_errors=True)
        shutil.rmtree(NSPAWN_STATE / "propagate" / name, ignore_errors=True)
        reaped.append(f"leftovers of {name} in {base}")
    for hierarchy in (*_own_cgroups(), *_own_v1_cgroups(V1_CPU_CONTROLLERS)):
        for group in hierarchy.glob("sparkd-test-*"):
            if group.name not in live:
                _remove_cgroup_tree(group)  # only empty cgroups can go: a busy one stays
    for entry in reaped:
        log.warning("reaped a stale test container: %s", entry)
    return reaped


def units_to_mask(host_root: Path = Path("/")) -> list[str]:
    """ALWAYS_MASKED, plus every unit the host's admin or packages enabled (the links in
    /etc/systemd/system/*.wants and *.requires), except targets and NEVER_MASKED."""
    names = set(ALWAYS_MASKED)
    etc = host_root / "etc/systemd/system"
    for link_dir in [*etc.glob("*.wants"), *etc.glob("*.requires")]:
        for link in link_dir.iterdir():
            if not link.name.endswith(".target"):
                names.add(link.name)
    return sorted(names - NEVER_MASKED)


class Container:
    """One systemd container: boot, run commands in it, cut its power, boot it again.

    Every wait has a timeout; every failure raises ContainerError or ExecError with what the
    harness saw (journal and console tails included). `cleanup()` (or leaving the `with`
    block) always stops it, unmounts everything and removes its files, on the host too.
    """

    def __init__(
        self,
        *,
        name: str | None = None,
        deb_dir: Path | None = None,
        src_dir: Path | None = None,
        tmpfs_size: str = "6g",
        extra_masks: Iterable[str] = (),
        extra_nspawn_args: Sequence[str] = (),
        image: Path = Path("/"),
        v1_controllers: Iterable[str] = (),
    ) -> None:
        self.name = name or f"sparkd-test-{uuid.uuid4().hex[:8]}"
        # The overlay's lower directory: the host's / by default, or a root filesystem such
        # as the Debian 13 one tests/system/image.sh makes (tests/system/images.py).
        self.image = image.resolve()
        self.deb_dir = deb_dir.resolve() if deb_dir else None
        self.src_dir = src_dir.resolve() if src_dir else None
        self.tmpfs_size = tmpfs_size
        self.extra_masks = tuple(extra_masks)
        self.extra_nspawn_args = tuple(extra_nspawn_args)
        # cgroup v1 controller hierarchies (cpu, cpuacct) the container gets a cgroup of its
        # own in, as in the tracking ones: nspawn mounts them read-only in the container; a
        # test that remounts one writable (tests/system/test_desktop.py) writes only under it.
        self.v1_controllers = tuple(v1_controllers)
        self.base: Path | None = None
        self.boots = 0
        self._proc: subprocess.Popen[bytes] | None = None
        self._pid1: int | None = None
        self._mounted = False
        self._lock_files: set[Path] = set()
        self._cgroups: list[Path] = []

    # -- paths ------------------------------------------------------------------------

    @property
    def root(self) -> Path:
        """The container's / as the host sees it (valid while the overlay is mounted)."""
        return self._base() / "root"

    @property
    def log_path(self) -> Path:
        return self._base() / "nspawn.log"

    def host_path(self, path: str) -> Path:
        """Where a container path lies on the host. Only for the overlay: the container's
        /run, /tmp-like tmpfs mounts and /proc are not there."""
        return self.root / path.lstrip("/")

    @property
    def pid(self) -> int:
        """The host pid of the container's PID 1 (systemd)."""
        if self._pid1 is None or not self.running:
            raise ContainerError(f"{self.name} is not running")
        return self._pid1

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def _base(self) -> Path:
        if self.base is None:
            self.base = Path(tempfile.mkdtemp(prefix=f"{self.name}-"))
            # Who owns it: reap_stale_containers() leaves alone what a live process owns.
            (self.base / "owner").write_text(f"{_process_identity(os.getpid())}\n")
        return self.base

    # -- mounts -----------------------------------------------------------------------

    def _mount(self) -> None:
        base = self._base()
        fs, root = base / "fs", base / "root"
        first = not fs.exists()
        if first:
            fs.mkdir()
            root.mkdir()
            _run(
                [
                    "mount",
                    "-t",
                    "tmpfs",
                    "-o",
                    f"size={self.tmpfs_size},mode=0755",
                    f"{self.name}-fs",
                    str(fs),
                ]
            )
            (fs / "upper").mkdir()
            (fs / "work").mkdir()
        options = f"lowerdir={self.image},upperdir={fs}/upper,workdir={fs}/work"
        _run(["mount", "-t", "overlay", "-o", options, f"{self.name}-root", str(root)])
        self._mounted = True
        if first:
            self._prepare_image()
        # nspawn locks the image by its inode; a remount gets a new device number.
        st = root.stat()
        self._lock_files.add(NSPAWN_STATE / "locks" / f"inode-{st.st_dev}:{st.st_ino}")

    def _prepare_image(self) -> None:
        root = self.root
        # A machine id of its own (systemd would otherwise copy the dbus one, the host's).
        for stale in ("etc/machine-id", "var/lib/dbus/machine-id"):
            with contextlib.suppress(FileNotFoundError):
                (root / stale).unlink()
        # No host mounts (a /boot/efi entry would make the boot wait 90 s for its device).
        for table in ("etc/fstab", "etc/crypttab"):
            if (root / table).exists():
                (root / table).write_text("# emptied by the sparkd test harness\n")
        # Container images often carry a policy-rc.d that forbids starting services
        # (exit 101): here packages must start their services as on a real machine.
        with contextlib.suppress(FileNotFoundError):
            (root / "usr/sbin/policy-rc.d").unlink()
        # Its own name (PID 1 would set the host's from /etc/hostname).
        (root / "etc/hostname").write_text(f"{self.name}\n")
        # A persistent journal, so `journalctl -b -1` shows the boot before a power cut.
        (root / "var/log/journal").mkdir(parents=True, exist_ok=True)
        masked = [*units_to_mask(self.image), *self.extra_masks]
        unit_dir = root / "etc/systemd/system"
        for unit in masked:
            link = unit_dir / unit
            with contextlib.suppress(FileNotFoundError):
                link.unlink()
            link.symlink_to("/dev/null")
        log.info("%s: image prepared in %s, masked %s", self.name, self.base, ", ".join(masked))

    # -- cgroups ----------------------------------------------------------------------

    def _create_cgroups(self) -> list[Path]:
        self._remove_cgroups()
        self._cgroups = [base / self.name for base in
                         (*_own_cgroups(), *_own_v1_cgroups(self.v1_controllers))]
        for group in self._cgroups:
            group.mkdir(exist_ok=True)
        if not self._cgroups:
            log.warning("%s: no cgroup hierarchy found to give the container its own", self.name)
        return self._cgroups

    def _remove_cgroups(self) -> None:
        """Remove the container's cgroup trees (empty once its processes are gone)."""
        for group in self._cgroups:
            _remove_cgroup_tree(group)
        self._cgroups = []

    # -- boot -------------------------------------------------------------------------

    def boot(self, *, timeout: float = 60.0) -> None:
        """Start the container (a first boot, or the next boot of the same overlay) and wait
        until its PID 1 runs. Then call wait_running()."""
        if self.running:
            raise ContainerError(f"{self.name} is already running")
        if not self._mounted:
            self._mount()
        argv = [
            "systemd-nspawn",
            "--register=no",
            "--keep-unit",
            "--private-network",
            "--console=read-only",
            "-D",
            str(self.root),
            "-M",
            self.name,
        ]
        if self.deb_dir is not None:
            argv.append(f"--bind-ro={self.deb_dir}:{DEB_MOUNT}")
        if self.src_dir is not None:
            argv.append(f"--bind-ro={self.src_dir}:{SRC_MOUNT}")
        argv += [*self.extra_nspawn_args, "-b", "systemd.firstboot=off"]
        env = {
            **os.environ,
            "SYSTEMD_NSPAWN_API_VFS_WRITABLE": "1",
            "TERM": "dumb",
            LONG_LIVED_ENV: self.name,
        }
        # Into cgroups of its own first: nspawn puts the container in "payload" under its
        # own cgroup, so two containers started from one cgroup would share one tree (and
        # systemctl kill in one sees the other's processes: "Input/output error").
        join = "".join(
            f"echo $$ > {shlex.quote(str(group / 'cgroup.procs'))} && "
            for group in self._create_cgroups()
        )
        launcher = ["/bin/sh", "-c", f'{join}exec "$@"', "sh", *argv]
        self.boots += 1
        with self.log_path.open("ab") as console:
            console.write(f"\n===== boot {self.boots}: {shlex.join(argv)}\n".encode())
            console.flush()
            start = time.monotonic()
            self._proc = subprocess.Popen(
                launcher,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                env=env,
                cwd="/",
                start_new_session=True,
            )
        self._pid1 = self._find_pid1(timeout)
        log.info(
            "%s: boot %d: PID 1 is host pid %d after %.1f s",
            self.name,
            self.boots,
            self._pid1,
            time.monotonic() - start,
        )

    def _find_pid1(self, timeout: float) -> int:
        assert self._proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                raise ContainerError(
                    f"systemd-nspawn exited with {self._proc.returncode} during boot "
                    f"{self.boots}:\n{self.console_tail()}"
                )
            for child in _children(self._proc.pid):
                if _comm(child) == "systemd" and _namespace_pid(child) == 1:
                    return child
            time.sleep(0.05)
        raise ContainerError(
            f"no systemd PID 1 under systemd-nspawn after {timeout:.0f} s:\n{self.console_tail()}"
        )

    def wait_running(self, *, timeout: float = 120.0) -> str:
        """Wait until the boot is finished: "running", or "degraded" (logged with the failed
        units). Anything else raises with the journal."""
        start = time.monotonic()
        deadline = start + timeout
        state = "unknown"
        while time.monotonic() < deadline:
            result = self.exec(
                ["systemctl", "is-system-running", "--wait"],
                check=False,
                timeout=max(1.0, deadline - time.monotonic()),
                quiet=True,
            )
            state = result.stdout.strip() or "unknown"
            if state == "running":
                log.info("%s: running after %.1f s", self.name, time.monotonic() - start)
                return state
            if state == "degraded":
                failed = self.exec(
                    ["systemctl", "--failed", "--no-legend", "--plain"], check=False
                ).stdout.strip()
                log.warning(
                    "%s: degraded after %.1f s; failed units:\n%s",
                    self.name,
                    time.monotonic() - start,
                    failed,
                )
                return state
            if state not in ("initializing", "starting", "unknown", "offline"):
                break
            # "offline"/"unknown": the bus is not up yet; the --wait returns at once then.
            time.sleep(0.2)
        raise ContainerError(
            f"{self.name}: system state {state!r}, not running, after "
            f"{time.monotonic() - start:.0f} s\n{self.diagnostics()}"
        )

    # -- commands ---------------------------------------------------------------------

    def exec(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
        quiet: bool = False,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the container (all its namespaces, its root) and wait for it.

        The environment is CONTAINER_ENV updated with env, never the host's. On timeout the
        command and everything it started are killed and subprocess.TimeoutExpired raised;
        with check, a non-zero exit raises ExecError (its str() has the output).
        """
        command = [
            "nsenter",
            "-t",
            str(self.pid),
            "-m",
            "-u",
            "-i",
            "-n",
            "-p",
            "-r",
            "-w",
            "--",
            *argv,
        ]
        if not quiet:
            log.info("%s$ %s", self.name, shlex.join(argv))
        proc = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if input is not None else subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            errors="replace",
            env={**CONTAINER_ENV, **(env or {})},
            start_new_session=True,
        )
        try:
            stdout, stderr = proc.communicate(input, timeout=timeout)
        except subprocess.TimeoutExpired:
            # nsenter's child (inside the container) is in nsenter's process group.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            stdout, stderr = proc.communicate()
            _wait_group_gone(proc.pid, timeout=10.0)
            log.error("%s: timed out after %.0f s: %s", self.name, timeout, shlex.join(argv))
            raise subprocess.TimeoutExpired(list(argv), timeout, stdout, stderr) from None
        result = subprocess.CompletedProcess(list(argv), proc.returncode, stdout, stderr)
        if check and result.returncode != 0:
            raise ExecError(result.returncode, list(argv), stdout, stderr)
        return result

    def sh(
        self,
        script: str,
        *,
        check: bool = True,
        timeout: float = 60.0,
        env: Mapping[str, str] | None = None,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """exec(["/bin/sh", "-ec", script]): a shell script inside the container."""
        return self.exec(
            ["/bin/sh", "-ec", script], check=check, timeout=timeout, env=env, input=input
        )

    def boot_id(self) -> str:
        return self.exec(["cat", "/proc/sys/kernel/random/boot_id"], quiet=True).stdout.strip()

    def journal(self, *, lines: int = 200, unit: str | None = None, boot: str = "0") -> str:
        argv = ["journalctl", "-b", boot, "--no-pager", "-o", "short-precise", "-n", str(lines)]
        if unit is not None:
            argv += ["-u", unit]
        result = self.exec(argv, check=False, timeout=30, quiet=True)
        return result.stdout + result.stderr

    def console_tail(self, characters: int = 6000) -> str:
        """The last of what nspawn and the container's console printed."""
        try:
            return self.log_path.read_bytes()[-characters:].decode(errors="replace")
        except OSError as exc:
            return f"(no console log: {exc})"

    def diagnostics(self) -> str:
        """Failed units and the journal of this boot (or the console when not running)."""
        if not self.running:
            return f"--- console of {self.name}:\n{self.console_tail()}"
        try:
            failed = self.exec(
                ["systemctl", "--failed", "--no-legend", "--plain"],
                check=False,
                timeout=20,
                quiet=True,
            ).stdout
            journal = self.journal(lines=200)
        except (ContainerError, subprocess.SubprocessError, OSError) as exc:
            return f"(diagnostics failed: {exc})\n--- console:\n{self.console_tail()}"
        return f"--- failed units:\n{failed}--- journalctl -b -n 200:\n{journal}"

    # -- units and the package ----------------------------------------------------------

    def wait_unit_active(self, unit: str, *, timeout: float = 60.0) -> None:
        """Wait until unit is active; "failed" or the timeout raise with its status and log."""
        start = time.monotonic()
        state = "unknown"
        while time.monotonic() - start < timeout:
            state = self.exec(
                ["systemctl", "is-active", unit], check=False, quiet=True
            ).stdout.strip()
            if state == "active":
                log.info("%s: %s active after %.1f s", self.name, unit, time.monotonic() - start)
                return
            if state == "failed":
                break
            time.sleep(0.2)
        status = self.exec(
            ["systemctl", "status", "--no-pager", "--lines=0", unit], check=False, quiet=True
        )
        raise ContainerError(
            f"{self.name}: {unit} is {state!r}, not active, after "
            f"{time.monotonic() - start:.0f} s\n{status.stdout}{status.stderr}"
            f"--- journalctl -u {unit}:\n{self.journal(unit=unit, lines=100)}"
        )

    def install_deb(
        self, deb: str | None = None, *, wait_active: bool = True, timeout: float = 180.0
    ) -> None:
        """dpkg -i the package from deb_dir (mounted at /mnt/deb); deb is its file name,
        found there when None. With wait_active, wait until sparkd.service is active."""
        if self.deb_dir is None:
            raise ContainerError("install_deb needs Container(deb_dir=...)")
        if deb is None:
            debs = sorted(p.name for p in self.deb_dir.glob("sparkd_*.deb"))
            if len(debs) != 1:
                raise ContainerError(f"expected one sparkd_*.deb in {self.deb_dir}, found {debs}")
            deb = debs[0]
        start = time.monotonic()
        result = self.exec(["dpkg", "-i", f"{DEB_MOUNT}/{deb}"], timeout=timeout)
        log.info(
            "%s: dpkg -i %s in %.1f s:\n%s%s",
            self.name,
            deb,
            time.monotonic() - start,
            result.stdout,
            result.stderr,
        )
        if wait_active:
            left = timeout - (time.monotonic() - start)
            self.wait_unit_active("sparkd.service", timeout=max(10.0, left))

    # -- power --------------------------------------------------------------------------

    def power_cut(self, *, timeout: float = 30.0) -> None:
        """Kill every process of the container at once (SIGKILL to its PID 1 ends its PID
        namespace), then the nspawn process; keep the overlay for the next boot()."""
        if not self.running:
            raise ContainerError(f"{self.name} is not running")
        log.info("%s: power cut (boot %d)", self.name, self.boots)
        self._kill(timeout=timeout)
        # A fresh mount of the same upper directory: nothing of the old boot stays in memory.
        _unmount(self.root)
        self._mounted = False
        self._mount()

    def stop(self, *, timeout: float = 60.0) -> None:
        """An orderly shutdown (nspawn turns SIGTERM into a halt of the container's systemd);
        a power cut when that takes longer than timeout. The overlay stays for boot()."""
        if not self.running:
            return
        assert self._proc is not None
        start = time.monotonic()
        self._proc.send_signal(signal.SIGTERM)
        try:
            self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            log.error(
                "%s: no clean shutdown after %.0f s: killing it\n%s",
                self.name,
                timeout,
                self.console_tail(),
            )
            self._kill(timeout=30.0)
        else:
            log.info(
                "%s: stopped in %.1f s (exit status %d)",
                self.name,
                time.monotonic() - start,
                self._proc.returncode,
            )
        self._pid1 = None
        self._remove_cgroups()

    def _kill(self, *, timeout: float) -> None:
        assert self._proc is not None
        # PID 1 first: if nspawn died first, the container's init would be re-parented to
        # the host's PID 1 and linger as a zombie there.
        if self._pid1 is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid1, signal.SIGKILL)
        try:
            self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            try:
                self._proc.wait(timeout)
            except subprocess.TimeoutExpired as exc:
                pid = self._proc.pid
                raise ContainerError(f"systemd-nspawn pid {pid} survives SIGKILL") from exc
        self._pid1 = None
        self._remove_cgroups()

    # -- cleanup ------------------------------------------------------------------------

    def cleanup(self) -> None:
        """Stop the container (a kill), unmount everything, remove its files and nspawn's
        entries under /run/systemd/nspawn. Safe to call more than once."""
        errors: list[str] = []
        if self.running:
            try:
                self._kill(timeout=30.0)
            except ContainerError as exc:
                errors.append(str(exc))
        elif self._proc is not None:
            self._proc.wait()
        self._remove_cgroups()
        if self.base is not None:
            for point in _mount_points_under(self.base):
                try:
                    _unmount(point)
                except ContainerError as exc:
                    errors.append(str(exc))
            self._mounted = False
            # Never delete through a mount: the overlay's lower directory is the host's /.
            if _mount_points_under(self.base):
                errors.append(f"still mounted under {self.base}: not removing it")
            else:
                shutil.rmtree(self.base, ignore_errors=True)
                self.base = None
        for leftover in (
            NSPAWN_STATE / "propagate" / self.name,
            NSPAWN_STATE / "unix-export" / self.name,
        ):
            if leftover.exists() and not _mount_points_under(leftover):
                shutil.rmtree(leftover, ignore_errors=True)
        for lock in self._lock_files:
            with contextlib.suppress(FileNotFoundError):
                lock.unlink()
        if errors:
            raise ContainerError(f"cleanup of {self.name}: " + "; ".join(errors))
        log.info("%s: cleaned up", self.name)

    def __enter__(self) -> Container:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            if exc is not None and self.running:
                log.error("%s: failing with %r:\n%s", self.name, exc, self.diagnostics())
        finally:
            self.cleanup()


def _own_cgroups() -> list[Path]:
    """This process's cgroup in each hierarchy systemd tracks processes with: the cgroup2
    one (at /sys/fs/cgroup, or /sys/fs/cgroup/unified on hybrid hosts) and, on hybrid and
    legacy hosts, the named v1 hierarchy name=systemd."""
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as cgroups:
        for line in cgroups:
            hierarchy, controllers, path = line.rstrip("\n").split(":", 2)
            if hierarchy == "0":
                own["cgroup2"] = path
            elif controllers == "name=systemd":
                own["name=systemd"] = path
    found: list[Path] = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            fstype, options = fields[separator + 1], fields[separator + 3]
            if fstype == "cgroup2":
                key = "cgroup2"
            elif fstype == "cgroup" and "name=systemd" in options.split(","):
                key = "name=systemd"
            else:
                continue
            if key not in own:
                continue
            path = own.pop(key)
            # Field 4 is the root of the mount within its hierarchy ("/" on a host).
            mount_root, mount_point = fields[3], fields[4]
            relative = path[len(mount_root) :] if path.startswith(mount_root) else path
            found.append(Path(mount_point) / relative.lstrip("/"))
    return found


def _own_v1_cgroups(controllers: Iterable[str]) -> list[Path]:
    """This process's cgroup in each mounted cgroup v1 hierarchy of `controllers` (a
    hierarchy that is not mounted, or cgroup v2 only: none)."""
    wanted = set(controllers)
    if not wanted:
        return []
    own: dict[str, str] = {}
    with open("/proc/self/cgroup") as cgroups:
        for line in cgroups:
            hierarchy, names, path = line.rstrip("\n").split(":", 2)
            for name in names.split(","):
                if hierarchy != "0" and name in wanted:
                    own[name] = path
    found: list[Path] = []
    with open("/proc/self/mountinfo") as mountinfo:
        for line in mountinfo:
            fields = line.split()
            separator = fields.index("-")
            if fields[separator + 1] != "cgroup":
                continue
            for name in fields[separator + 3].split(","):
                if name in own:
                    path = own.pop(name)
                    mount_root, mount_point = fields[3], fields[4]
                    relative = path[len(mount_root):] if path.startswith(mount_root) else path
                    found.append(Path(mount_point) / relative.lstrip("/"))
    return found


def _remove_cgroup_tree(group: Path, *, timeout: float = 5.0) -> None:
    """rmdir a cgroup and its descendants, deepest first, retrying while the processes of
    a killed container are still exiting."""
    deadline = time.monotonic() + timeout
    while group.exists():
        for dirpath, _, _ in os.walk(group, topdown=False):
            with contextlib.suppress(OSError):
                os.rmdir(dirpath)
        if not group.exists():
            return
        if time.monotonic() > deadline:
            log.warning("cannot remove cgroup %s (processes left in it?)", group)
            return
        time.sleep(0.05)


def _wait_group_gone(pgid: int, *, timeout: float) -> None:
    """Wait until process group pgid has no member left (zombies included: the killed
    command inside the container is reaped by the container's PID 1, a moment later)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.02)
    log.warning("process group %d still has members %.0f s after SIGKILL", pgid, timeout)


def _children(pid: int) -> list[int]:
    """The pids whose parent is pid (a scan of /proc: no psutil, whose stubs are absent)."""
    found: list[int] = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                # "pid (comm) state ppid ...": comm may hold spaces and parentheses.
                fields = stat.read().rpartition(")")[2].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            found.append(int(entry))
    return found


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as comm:
            return comm.read().strip()
    except OSError:
        return ""


def _namespace_pid(host_pid: int) -> int | None:
    """The pid of host_pid in its own (innermost) PID namespace."""
    try:
        with open(f"/proc/{host_pid}/status") as status:
            for line in status:
                if line.startswith("NSpid:"):
                    return int(line.split()[-1])
    except OSError:
        return None
    return None


# What the make_container fixture (tests/system/conftest.py) hands a test: call it for a
# booted, running container of the test's own; keyword arguments go to Container().
ContainerFactory = Callable[..., Container]
