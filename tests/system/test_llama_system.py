"""The real llama-server under sparkd in a booted systemd (issue 9, item 4, system tier): the
binary `make llama-server` built (cached outside the checkout, seen in the container through
its overlay of the host) and a tiny generated GGUF placed where a user puts models; a swap
sim -> llama.cpp -> sim behind the health gate on the real /health; a crash of the real engine
restarted by systemd; `sparkctl logs` showing its lines."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from checks import prop, serving, wait_for
from harness import SRC_MOUNT, Container

pytestmark = pytest.mark.system

REPO = Path(__file__).resolve().parents[2]
# On the host's disk (the checkout's build/, bound read-only at /src in the container): the
# container's own files live on a tmpfs upper layer, whose pages no drop can free.
HOST_GGUF = REPO / "build" / "tiny-system.gguf"
GGUF = f"{SRC_MOUNT}/build/tiny-system.gguf"


def binary() -> str:
    out = subprocess.run([str(REPO / "scripts" / "build-llama-server.sh"), "--print-path"],
                         capture_output=True, text=True, check=True, timeout=60).stdout
    return out.strip()


def config(llama: str) -> str:
    return f"""
[daemon]
default_model = "sim"
memory_reserve_gib = 1
health_interval_s = 1
settle_timeout_s = 2

[models.sim]
engine = "sim"
port = 8101
memory_gib = 0.1
load_timeout_s = 30
args = ["--load-seconds", "0.5", "--weights-mib", "8"]

[models.tiny]
engine = "llamacpp"
binary = "{llama}"
path = "{GGUF}"
port = 8102
memory_gib = 0.1
load_timeout_s = 60
args = ["--threads", "2", "--ctx-size", "512", "--parallel", "1"]
"""


@pytest.fixture(scope="module")
def box(container: Container) -> Iterator[Container]:
    llama = binary()
    assert Path(llama).exists(), f"{llama}: run `make llama-server`"
    container.exec(["systemctl", "stop", "sparkd", "sparkd-engine@*"])
    HOST_GGUF.parent.mkdir(exist_ok=True)
    subprocess.run([sys.executable, str(REPO / "tests" / "integration" / "tiny_gguf.py"),
                    str(HOST_GGUF)], check=True, capture_output=True, timeout=120)
    HOST_GGUF.chmod(0o644)
    container.exec(["tee", "/etc/sparkd.toml"], input=config(llama), quiet=True)
    container.exec(["rm", "-f", "/var/lib/sparkd/state.toml"])
    container.exec(["systemctl", "start", "sparkd"])
    wait_for("sim to serve", lambda: serving(container, "sim"), timeout=90)
    yield container


def chat(box: Container, port: int) -> tuple[int, str]:
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "hi"}],
                       "max_tokens": 4})
    res = box.exec(["curl", "-s", "-w", "\n%{http_code}", "-H",
                    "Content-Type: application/json", "-d", body,
                    f"http://127.0.0.1:{port}/v1/chat/completions"], check=False)
    text, _, code = res.stdout.rpartition("\n")
    return int(code or 0), text


def test_swap_to_the_real_llama_server_and_back(box: Container) -> None:
    res = box.exec(["sparkctl", "swap", "tiny"], check=False, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert serving(box, "tiny")
    code, text = chat(box, 8102)  # the engine itself answers
    assert code == 200, text
    log = box.exec(["journalctl", "-b", "-u", "sparkd-engine@tiny.service", "-o", "cat",
                    "--no-pager"]).stdout
    # The GGUF was just written on the host, so its pages may be cached: a warm start keeps them
    # (docs/watch.md, warm swaps); nothing cached, or too little room, is the blanket drop.
    assert ("prestart tiny: drop_caches: freed" in log
            or "prestart tiny: warm: kept" in log), log
    assert "wait-healthy: http://127.0.0.1:8102/health: healthy" in log
    status = json.loads(box.exec(["sparkctl", "status", "--json"]).stdout)
    tiny = next(e for e in status["engines"] if e["model"] == "tiny")
    assert tiny["engine_version"] == "11434"
    # The real engine maps the GGUF: its pages are in the page cache while it serves ...
    assert cached_bytes(box) > 0
    res = box.exec(["sparkctl", "swap", "sim"], check=False, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    assert prop(box, "sparkd-engine@tiny.service", "ActiveState") == "inactive"
    # ... and the next start's prestart dropped them (the seed's first disaster, on the real
    # model file's pages): blanket, or evicted as another model's file by a warm start of sim.
    assert cached_bytes(box) == 0


def cached_bytes(box: Container) -> int:
    """The GGUF's bytes in the page cache (util-linux fincore)."""
    out = box.exec(["fincore", "--bytes", "--noheadings", "--output", "RES", GGUF]).stdout
    return int(out.strip())


def test_a_crash_of_the_real_engine_is_restarted_and_logged(box: Container) -> None:
    box.exec(["sparkctl", "swap", "tiny"], timeout=180)
    pid = prop(box, "sparkd-engine@tiny.service", "MainPID")
    box.exec(["systemctl", "kill", "-s", "SIGKILL", "sparkd-engine@tiny.service"])
    wait_for("tiny to serve again", lambda: prop(box, "sparkd-engine@tiny.service", "MainPID")
             not in ("0", pid) and serving(box, "tiny"), timeout=90)
    assert chat(box, 8102)[0] == 200
    logs = box.exec(["sparkctl", "logs", "--model", "tiny", "--since", "-10min"],
                    check=False).stdout
    # llama-server's own line (b11434), beside sparkd's events for the model
    assert "llama_server: listening on http://127.0.0.1:8102" in logs, logs[-2000:]
    assert "swap_done" in logs
    box.exec(["sparkctl", "swap", "sim"], timeout=180)
