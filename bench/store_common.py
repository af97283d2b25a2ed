"""Shared by the store benchmarks (issue 4): the machine's description, a scratch directory
on disk, and the fake hub from tests/integration run in a process of its own (so the server
and the client do not share a GIL)."""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from machine import describe

REPO_ROOT = Path(__file__).resolve().parents[1]
HUBSERVER_DIR = REPO_ROOT / "tests" / "integration"


def machine() -> str:
    return describe()


@contextlib.contextmanager
def scratch(prefix: str) -> Iterator[Path]:
    """A directory on the disk (/var/tmp: not a tmpfs), removed afterwards."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


SERVE = r"""
import json, random, sys
sys.path.insert(0, sys.argv[1])
from hubserver import FakeHub
spec = json.loads(sys.argv[2])
files = {}
for name, (size, seed) in spec["files"].items():
    block = random.Random(seed).randbytes(min(size, 64 << 20))
    files[name] = (block * (size // len(block) + 1))[:size]
hub = FakeHub()
hub.rate = spec.get("rate")
repo = hub.add_repo(spec["repo"], files)
hub.start()
print(json.dumps({"hub": hub.hub_port, "cdn": hub.cdn_port, "commit": repo.commit}), flush=True)
for line in sys.stdin:  # "log" asks for the request log; EOF stops
    if line.strip() == "log":
        hub.wait_idle()
        print(json.dumps([e.__dict__ for e in hub.log]), flush=True)
    elif line.strip() == "reset":
        hub.reset_log()
        print("[]", flush=True)
hub.stop()
"""


class HubProcess:
    def __init__(self, repo: str, files: dict[str, tuple[int, int]], *,
                 rate: float | None = None) -> None:
        spec = json.dumps({"repo": repo, "files": files, "rate": rate})
        self.proc = subprocess.Popen(
            [sys.executable, "-c", SERVE, str(HUBSERVER_DIR), spec],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self.proc.stdout is not None
        ready = json.loads(self.proc.stdout.readline())
        self.hub_port: int = ready["hub"]
        self.cdn_port: int = ready["cdn"]
        self.commit: str = ready["commit"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.hub_port}"

    def _ask(self, what: str) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(what + "\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def log(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self._ask("log")
        return result

    def reset(self) -> None:
        self._ask("reset")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)
