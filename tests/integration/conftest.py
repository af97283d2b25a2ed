"""Shared integration fixtures: real `sparkd sim-engine` processes (the simulated engine, a
test double) on free loopback ports, always terminated and waited for when the test ends."""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

SPARKD = [sys.executable, "-c", "from sparkd.main import main; main()"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class SimEngine:
    """One simulated engine (a test double) running as a child process."""

    def __init__(self, proc: subprocess.Popen[bytes], *, port: int, path: Path, log: Path) -> None:
        self.proc = proc
        self.port = port
        self.path = path
        self.log_path = log
        self.started = time.monotonic()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def openai_url(self) -> str:
        return f"{self.base_url}/v1"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def request(
        self, method: str, path: str, body: bytes | None = None, *, timeout: float = 10
    ) -> tuple[int, Any]:
        """One HTTP request; the status and the JSON body (or the text when it is not JSON)."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            headers = {"Content-Type": "application/json"} if body is not None else {}
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            raw = response.read()
        finally:
            conn.close()
        try:
            return response.status, json.loads(raw)
        except ValueError:
            return response.status, raw.decode(errors="replace")

    def get(self, path: str) -> tuple[int, Any]:
        return self.request("GET", path)

    def post(self, path: str, body: bytes | Mapping[str, Any]) -> tuple[int, Any]:
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self.request("POST", path, raw)

    def wait_listening(self, timeout: float = 10) -> int:
        """Poll /health until the engine accepts connections; the first status it answers."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"engine exited {self.proc.returncode}:\n{self.log()}")
            try:
                return self.get("/health")[0]
            except OSError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"engine not listening:\n{self.log()}") from None
                time.sleep(0.02)

    def wait_health(self, status: int = 200, timeout: float = 10) -> float:
        """Poll /health until it answers `status`; the seconds since the process started."""
        deadline = time.monotonic() + timeout
        while self.wait_listening(timeout) != status:
            if time.monotonic() > deadline:
                raise AssertionError(f"/health never answered {status}:\n{self.log()}")
            time.sleep(0.02)
        return time.monotonic() - self.started

    def wait_exit(self, timeout: float = 10) -> int:
        return self.proc.wait(timeout)

    def terminate(self, timeout: float = 5) -> int:
        """SIGTERM, then wait; SIGKILL if it overstays (the test fails on the status then)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()


class SimEngines:
    """Starts simulated engines and stops every one it started."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.engines: list[SimEngine] = []

    def start(
        self,
        *args: str,
        model: str = "sim-test",
        path: Path | None = None,
        env: Mapping[str, str] | None = None,
        port: int | None = None,
    ) -> SimEngine:
        n = len(self.engines)
        path = path if path is not None else self.workdir / f"models-{n}" / model
        port = port if port is not None else free_port()
        argv = [*SPARKD, "sim-engine", "--model", model, "--path", str(path), "--port", str(port)]
        return self.start_command([*argv, *args], port=port, path=path, env=env)

    def start_command(
        self, argv: list[str], *, port: int, path: Path, env: Mapping[str, str] | None = None
    ) -> SimEngine:
        """Any engine's command line (a real llama-server's too), its output in a log file."""
        log = self.workdir / f"engine-{len(self.engines)}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env={**os.environ, **(env or {})},
            )
        engine = SimEngine(proc, port=port, path=path, log=log)
        self.engines.append(engine)
        return engine

    def stop_all(self) -> None:
        for engine in self.engines:
            with contextlib.suppress(Exception):
                engine.terminate()
            if engine.proc.poll() is None:  # pragma: no cover - terminate() kills
                engine.proc.kill()
                engine.proc.wait()


@pytest.fixture
def sim_engines(tmp_path: Path) -> Iterator[SimEngines]:
    engines = SimEngines(tmp_path)
    yield engines
    engines.stop_all()


@pytest.fixture(scope="module")
def module_sim_engines(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SimEngines]:
    engines = SimEngines(tmp_path_factory.mktemp("sim-engines"))
    yield engines
    engines.stop_all()


# --- the real llama-server ---------------------------------------------------------------

REPO = Path(__file__).resolve().parents[2]
SKIP_LLAMA_ENV = "SPARKD_SKIP_LLAMA_SERVER"


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """The upstream llama-server that `make llama-server` (scripts/build-llama-server.sh) built
    and cached. Missing, the tests that need it fail, naming the fix: CI must run them.
    SPARKD_SKIP_LLAMA_SERVER=1 skips them instead, for a machine that cannot build it."""
    if os.environ.get(SKIP_LLAMA_ENV):
        pytest.skip(f"{SKIP_LLAMA_ENV} is set: the real llama-server is not used")
    script = REPO / "scripts" / "build-llama-server.sh"
    where = subprocess.run([str(script), "--print-path"], capture_output=True, text=True,
                           check=True, timeout=30)
    binary = Path(where.stdout.strip())
    if not os.access(binary, os.X_OK):
        pytest.fail(f"{binary} is missing: run `make llama-server` (about 8 minutes on 2 cores "
                    f"the first time), or set {SKIP_LLAMA_ENV}=1 to skip the tests that need it")
    return binary


@pytest.fixture(scope="session")
def tiny_ggufs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Template name (tiny_gguf.TEMPLATES: "permissive", "strict") -> a tiny random-weight
    llama GGUF with that chat template."""
    from tiny_gguf import TEMPLATES, write_tiny_gguf

    folder = tmp_path_factory.mktemp("tiny-gguf")
    return {name: write_tiny_gguf(folder / f"tiny-{name}.gguf", template=name)
            for name in TEMPLATES}


SparkdRun = Any  # (*args: str, timeout: float = ...) -> subprocess.CompletedProcess[str]


@pytest.fixture
def sparkd_cli() -> Iterator[SparkdRun]:
    """Run `sparkd ARGS...` (this checkout's) as a child process, without $SPARKD_CONFIG;
    any child still running at teardown is killed."""
    children: list[subprocess.Popen[str]] = []

    def run(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        env = {k: v for k, v in os.environ.items() if k != "SPARKD_CONFIG"}
        child = subprocess.Popen(
            [sys.executable, "-c", "from sparkd.main import main; main()", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        children.append(child)
        out, err = child.communicate(timeout=timeout)
        return subprocess.CompletedProcess(child.args, child.returncode, out, err)

    yield run
    for child in children:
        if child.poll() is None:
            child.kill()
        child.communicate()
