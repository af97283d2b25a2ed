"""What the system tier, the demo and the benchmarks ask of sparkd inside a container."""

from __future__ import annotations

import json
import subprocess
import time
import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from harness import Container


def built_deb(repo: Path) -> Path:
    """Where `make deb` puts the package for this checkout's version (it may not exist)."""
    version = tomllib.loads((repo / "pyproject.toml").read_text())["project"]["version"]
    arch = subprocess.run(
        ["dpkg", "--print-architecture"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return repo / "build" / f"sparkd_{version}_{arch}.deb"


def wait_for(what: str, check: Callable[[], bool], *, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")


def prop(box: Container, unit: str, name: str) -> str:
    """One property of a unit, as `systemctl show -P` prints it."""
    return box.exec(["systemctl", "show", "-P", name, unit]).stdout.strip()


def status(box: Container) -> dict[str, Any] | None:
    """`sparkctl status --json`, or None while sparkd does not answer (it is restarting)."""
    res = box.exec(["sparkctl", "status", "--json"], check=False)
    if res.returncode != 0:
        return None
    result: dict[str, Any] = json.loads(res.stdout)
    return result


def serving(box: Container, model: str) -> bool:
    """sparkd reports `model` active and healthy, with no swap running (the status line may
    go on with a condition of sparkd's own: a refused reload, say)."""
    s = status(box)
    return (s is not None and s["swap"] is None and s["active_model"] == model
            and s["daemon"]["status_line"].startswith(f"{model}: serving, healthy"))
