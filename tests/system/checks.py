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


# Run inside a container (`python3 -c CHAT_POLLER MODEL SECONDS`): a chat completion through
# the gateway, retried every 20 ms until it answers 200; prints the wall time of that answer
# and how many attempts it took as JSON, or exits non-zero with the last failure.
CHAT_POLLER = r"""
import json, sys, time, urllib.request, urllib.error
body = json.dumps({"model": sys.argv[1], "max_tokens": 4,
                   "messages": [{"role": "user", "content": "hi"}]}).encode()
deadline = time.time() + float(sys.argv[2]); tries = 0; last = ""
while time.time() < deadline:
    tries += 1
    req = urllib.request.Request("http://127.0.0.1:8000/v1/chat/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            if r.status == 200:
                print(json.dumps({"t": time.time(), "tries": tries})); sys.exit(0)
    except urllib.error.HTTPError as e:
        last = f"HTTP {e.code}"
    except OSError as e:
        last = repr(e)
    time.sleep(0.02)
sys.exit(f"no 200 in {sys.argv[2]} s after {tries} tries; last: {last}")
"""
