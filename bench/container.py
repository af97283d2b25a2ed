"""A booted systemd container with the sparkd .deb installed, for benchmarks.

Uses the system tier's harness (tests/system/harness.py); run as root after `make deb`.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "system"))

from checks import CHAT_POLLER as CHAT_POLLER  # noqa: E402  (re-exported for the benches)
from checks import built_deb, status, wait_for  # noqa: E402
from harness import Container  # noqa: E402
from machine import describe  # noqa: E402


def deb_path() -> Path:
    deb = built_deb(REPO)
    if not deb.is_file():
        raise SystemExit(f"{deb} is missing: run `make deb` first")
    return deb


@contextmanager
def sparkd_container() -> Iterator[Container]:
    deb = deb_path()
    with Container(deb_dir=deb.parent, src_dir=REPO) as box:
        box.boot()
        box.wait_running()
        box.install_deb(deb.name)
        wait_serving(box)
        yield box


def wait_serving(box: Container, timeout: float = 60.0) -> None:
    wait_for("sparkd to report a healthy default model",
             lambda: (status(box) or {}).get("daemon", {}).get("status_line", "").endswith(
                 "serving, healthy"), timeout=timeout)


def machine() -> str:
    return describe()
