"""Root filesystems other than the host's for the system tier, and the .deb built in each.

The system tier boots the host's own / by default (Debian 12: Python 3.11, systemd 252).
A Spark runs DGX OS (Ubuntu 24.04: Python 3.12, systemd 255); the nearest reachable here is
Debian 13 (Python 3.13, systemd 257), made with debootstrap from Debian's archive:

    python3 tests/system/images.py trixie     # prints the root and the .deb, one a line

Two directories per image under CACHE (default /var/cache/sparkd-test), keyed by a stamp of
everything that goes into them (suite, mirror, package lists, IMAGE_VERSION), so a change to
any of them makes a new image and an unchanged one is reused:

    CACHE/trixie-STAMP/root     debootstrap minbase plus what the tests need to boot and
                                run, plus the built package's Depends, nothing more: the
                                test containers' lower directory (a program the package
                                runs without depending on it is missing here)
    CACHE/trixie-STAMP/build/   an overlay of root with the build tools (compiler, headers,
                                pip, dpkg-dev) and sparkd's source: packaging/build-deb.sh runs
                                there, with that root's own python3 and dpkg-deb, in a
                                systemd-nspawn that shares the host's network (pip)

The built package is copied to build/<image>/ in the checkout. The first run takes a few
minutes (debootstrap, then the build tools and the dependency wheels for that python);
later runs rebuild only the package (seconds).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("images")

IMAGE_VERSION = "1"
CACHE = Path(os.environ.get("SPARKD_TEST_IMAGE_CACHE", "/var/cache/sparkd-test"))
DEFAULT_MIRROR = "http://deb.debian.org/debian"
# What a container needs to boot, and what the tests run inside it. The package's own
# dependencies are installed into the root after each build, from the .deb's Depends
# (apt-get satisfy), and nothing else: a program the package runs but does not depend on is
# missing there (procps, for /bin/kill, comes only through the Depends: drop it and the
# reload test fails on this image).
RUNTIME_PACKAGES = ("systemd", "dbus", "python3", "curl")
BUILD_PACKAGES = (
    "python3-pip",
    "python3-dev",
    "gcc",
    "libsystemd-dev",
    "pkg-config",
    "dpkg-dev",
    "binutils",
)
# What build-deb.sh reads from the checkout (and nothing else: no .venv, no build/).
SOURCES = ("pyproject.toml", "README.md", "LICENSE", "sparkd", "units", "etc", "docs",
           "packaging")
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Image:
    name: str
    suite: str
    description: str


IMAGES = {"trixie": Image("trixie", "trixie", "Debian 13: Python 3.13, systemd 257")}


def run(argv: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 900) -> None:
    log.info("$ %s", " ".join(argv))
    # Their output goes to stderr: stdout is this script's answer (the root and the .deb).
    subprocess.run(list(argv), check=True, timeout=timeout, env=env, stdout=sys.stderr)


def debian_mirror() -> str:
    """The Debian archive apt uses on this host (its sources), else deb.debian.org."""
    candidates = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in candidates:
        if not path.is_file() or not path.name.endswith((".list", ".sources")):
            continue
        text = path.read_text(errors="replace")
        for url in re.findall(r"^(?:URIs:|deb)\s+(?:\[[^\]]*\]\s+)?(\S+)", text, re.M):
            url = str(url).rstrip("/")
            if url.endswith("/debian"):
                return url
    return DEFAULT_MIRROR


def stamp(image: Image, mirror: str) -> str:
    key = "\n".join([IMAGE_VERSION, image.suite, mirror, *RUNTIME_PACKAGES, "--",
                     *BUILD_PACKAGES])
    return hashlib.sha256(key.encode()).hexdigest()[:12]


@contextlib.contextmanager
def locked(path: Path) -> Iterator[None]:
    """One maker of an image at a time (two test runs on one host wait for each other)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def make_root(image: Image, base: Path, mirror: str) -> Path:
    """debootstrap the runtime root once; a half-made one (no .done) is made again."""
    root = base / "root"
    done = base / "root.done"
    if done.exists():
        return root
    shutil.rmtree(base, ignore_errors=True)
    base.mkdir(parents=True)
    start = time.monotonic()
    run(["debootstrap", "--variant=minbase", f"--include={','.join(RUNTIME_PACKAGES)}",
         image.suite, str(root), mirror])
    # No package caches in the image the tests boot.
    run(["chroot", str(root), "apt-get", "clean"])
    done.write_text(f"{time.time()}\n")
    log.info("%s: root made in %.0f s", image.name, time.monotonic() - start)
    return root


@contextlib.contextmanager
def build_overlay(base: Path, root: Path) -> Iterator[Path]:
    """The build directory: root below, the build tools and the source above (kept)."""
    upper, work, merged = base / "build/upper", base / "build/work", base / "build/merged"
    for d in (upper, work, merged):
        d.mkdir(parents=True, exist_ok=True)
    options = f"lowerdir={root},upperdir={upper},workdir={work}"
    run(["mount", "-t", "overlay", "-o", options, "sparkd-image-build", str(merged)])
    try:
        yield merged
    finally:
        run(["umount", str(merged)])


def host_ca_bundle() -> Path | None:
    """The CA certificates the host's pip trusts (a site may inspect TLS with its own CA,
    which the image's fresh ca-certificates does not know)."""
    for candidate in (os.environ.get("PIP_CERT"), os.environ.get("SSL_CERT_FILE"),
                      "/etc/ssl/certs/ca-certificates.crt"):
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    return None


def install_dependencies(root: Path, deb: Path) -> None:
    """The .deb's Depends into the runtime root (already there: a no-op of a second)."""
    depends = subprocess.run(["dpkg-deb", "-f", str(deb), "Depends"], capture_output=True,
                             text=True, check=True).stdout.strip()
    nspawn(root, ["apt-get", "satisfy", "-y", "-q", "--no-install-recommends", depends])
    nspawn(root, ["apt-get", "clean"])


def nspawn(merged: Path, argv: Sequence[str], *, chdir: str = "/") -> None:
    """argv in the build root: its own /proc and /dev, the host's network (apt, pip) and
    the host's CA certificates for pip."""
    options = ["--quiet", "--register=no", "--keep-unit", "--resolv-conf=copy-host",
               "--machine=sparkd-image-build", "-D", str(merged), f"--chdir={chdir}",
               "--setenv=DEBIAN_FRONTEND=noninteractive",
               "--setenv=PIP_DISABLE_PIP_VERSION_CHECK=1"]
    ca = host_ca_bundle()
    if ca is not None:
        options += [f"--bind-ro={ca.resolve()}:/run/host-ca.crt",
                    "--setenv=PIP_CERT=/run/host-ca.crt"]
    run(["systemd-nspawn", *options, "--", *argv])


def build_deb(image: Image, base: Path, root: Path) -> Path:
    """packaging/build-deb.sh in the build overlay; the .deb copied to build/<image>/."""
    out_dir = REPO / "build" / image.name
    with build_overlay(base, root) as merged:
        tools_done = base / "build/tools.done"
        if not tools_done.exists():
            nspawn(merged, ["apt-get", "update", "-q"])
            nspawn(merged, ["apt-get", "install", "-y", "-q", "--no-install-recommends",
                            *BUILD_PACKAGES])
            tools_done.write_text(f"{time.time()}\n")
        src = merged / "var/tmp/sparkd-src"
        src.mkdir(parents=True, exist_ok=True)
        for name in SOURCES:
            target = src / name
            if target.is_dir():
                shutil.rmtree(target)
            elif target.exists():
                target.unlink()
            source = REPO / name
            if source.is_dir():
                shutil.copytree(source, target,
                                ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
            elif source.exists():
                shutil.copy2(source, target)
        shutil.rmtree(src / "build", ignore_errors=True)
        nspawn(merged, ["/bin/bash", "packaging/build-deb.sh"], chdir="/var/tmp/sparkd-src")
        debs = sorted((src / "build").glob("sparkd_*.deb"))
        if len(debs) != 1:
            raise RuntimeError(f"expected one .deb in {src / 'build'}, found {debs}")
        shutil.rmtree(out_dir, ignore_errors=True)
        out_dir.mkdir(parents=True)
        deb = out_dir / debs[0].name
        shutil.copy2(debs[0], deb)
    return deb


def prepare(name: str) -> tuple[Path, Path]:
    """(root, deb) of the image called name, made or reused, the package built anew."""
    image = IMAGES[name]
    mirror = debian_mirror()
    base = CACHE / f"{image.name}-{stamp(image, mirror)}"
    with locked(CACHE / f".{image.name}.lock"):
        root = make_root(image, base, mirror)
        deb = build_deb(image, base, root)
        install_dependencies(root, deb)
    # Images of older stamps are left over from an earlier version of this file.
    for stale in CACHE.glob(f"{image.name}-*"):
        if stale != base and stale.is_dir() and not (stale / "build/merged").is_mount():
            log.info("removing the outdated image %s", stale)
            shutil.rmtree(stale, ignore_errors=True)
    return root, deb


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("image", choices=sorted(IMAGES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="images: %(message)s", stream=sys.stderr)
    if os.geteuid() != 0:
        print("images.py must run as root (debootstrap, mount, systemd-nspawn)", file=sys.stderr)
        return 1
    root, deb = prepare(args.image)
    print(root)
    print(deb)
    return 0


if __name__ == "__main__":
    sys.exit(main())
