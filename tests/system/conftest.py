"""Fixtures of the system tier: booted systemd containers with the sparkd package installed.

Nothing here builds: `make test-system` builds build/sparkd_VERSION_ARCH.deb first. A missing
prerequisite (root, systemd-nspawn, overlay support) or a missing .deb fails every test of
the tier with the reason; SPARKD_SKIP_SYSTEM=1, set by a person, skips them instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from checks import built_deb
from harness import (
    Container,
    ContainerError,
    ContainerFactory,
    missing_prerequisites,
    reap_stale_containers,
)

REPO = Path(__file__).resolve().parents[2]
SKIP_VARIABLE = "SPARKD_SKIP_SYSTEM"
# Another root filesystem than the host's, and the package built in it (tests/system/images.py;
# `make test-system-trixie` sets both).
IMAGE_VARIABLE = "SPARKD_TEST_IMAGE_ROOT"
DEB_VARIABLE = "SPARKD_TEST_DEB"


@pytest.fixture(scope="session", autouse=True)
def system_prerequisites() -> None:
    """Fail (or, with SPARKD_SKIP_SYSTEM=1, skip) the tier when containers cannot boot."""
    if os.environ.get(SKIP_VARIABLE) == "1":
        pytest.skip(f"{SKIP_VARIABLE}=1: the system tier was skipped on request")
    problems = missing_prerequisites()
    if not problems:
        # Leftovers of an earlier run that was killed before it could clean up.
        reap_stale_containers()
    if problems:
        pytest.fail(
            "the system tier cannot run here: "
            + "; ".join(problems)
            + f" (set {SKIP_VARIABLE}=1 to skip it on purpose)",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def image_root() -> Path:
    """The containers' lower directory: the host's / unless $SPARKD_TEST_IMAGE_ROOT says."""
    root = Path(os.environ.get(IMAGE_VARIABLE) or "/")
    if not (root / "usr/lib/systemd/systemd").exists():
        pytest.fail(f"{IMAGE_VARIABLE}={root}: no systemd in that root", pytrace=False)
    return root


@pytest.fixture(scope="session")
def deb_path() -> Path:
    """The package `make deb` built for this checkout's version (or $SPARKD_TEST_DEB)."""
    deb = Path(os.environ[DEB_VARIABLE]) if os.environ.get(DEB_VARIABLE) else built_deb(REPO)
    if not deb.is_file():
        pytest.fail(f"{deb} does not exist: run `make deb` (make test-system does)", pytrace=False)
    return deb


@pytest.fixture
def make_container(deb_path: Path, image_root: Path) -> Iterator[ContainerFactory]:
    """Booted, running containers of this test's own (the package is not installed):
    `box = make_container()`. All are cleaned up when the test ends."""
    made: list[Container] = []

    def make(**kwargs: Any) -> Container:
        kwargs.setdefault("image", image_root)
        box = Container(deb_dir=deb_path.parent, src_dir=REPO, **kwargs)
        made.append(box)
        box.boot()
        box.wait_running()
        return box

    yield make
    errors = []
    for box in made:
        try:
            box.cleanup()
        except ContainerError as exc:
            errors.append(str(exc))
    if errors:
        pytest.fail("; ".join(errors), pytrace=False)


@pytest.fixture(scope="module")
def container(deb_path: Path, image_root: Path) -> Iterator[Container]:
    """One booted container per test module, with the sparkd package installed and
    sparkd.service active. Tests of a module share it: one that cuts its power must boot()
    and wait_running() it again before it returns."""
    with Container(deb_dir=deb_path.parent, src_dir=REPO, image=image_root) as box:
        box.boot()
        box.wait_running()
        box.install_deb(deb_path.name)
        yield box


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test that used a container gets its journal and failed units in the report."""
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]
    if not report.failed or call.when == "teardown":
        return
    funcargs = getattr(item, "funcargs", {})
    for name, value in funcargs.items():
        if isinstance(value, Container) and value.running:
            report.sections.append((f"container {value.name} ({name})", value.diagnostics()))
