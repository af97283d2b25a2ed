"""Bars (issue 5): the gateway's cost over calling the engine directly, side by side in one run
against the same simulated engine (a test double), with a minimal aiohttp pass-through proxy
(bench/minimal_proxy.py, the ceiling for a Python proxy here) and LiteLLM's proxy beside it.

    added latency, one client:     p50 <= 0.5 ms, p99 <= 2 ms over direct
    added p99 at 1,000 req/s open loop over 64 connections (below saturation): <= 5 ms
    time to first streamed token:  within 0.2 ms of direct (p50)
    throughput at 64 connections:  >= 0.8x the minimal proxy's

Everything shares this machine's cores: the load generator (this process, aiohttp), the
engine, and the proxy under test. The engine replies one token at a very high decode rate so
that what is measured is the proxies, not the generation. The gateway runs as `sparkd gateway`
with a sparkd-managed model (role_policy = "strict": the system message is folded into the user
turn, so every request is rewritten and re-encoded)
whose engine it learns from a fake daemon's subscribe stream, exactly as in production.
Requests of the targets are interleaved (one-client phases) or run back to back (load
phases) in one run.

    python bench/gateway_bench.py [--litellm-venv DIR] [--quick] [--no-record]

LiteLLM: `pip install 'litellm[proxy]'` into --litellm-venv (default build/litellm-venv; the
script creates it when missing). It is never a dependency of sparkd or of `make test`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sparkd.control.protocol import Request  # noqa: E402
from sparkd.control.server import ControlServer  # noqa: E402
from sparkd.control.status import (  # noqa: E402
    DaemonRecord,
    EngineRecord,
    Event,
    HealthRecord,
    Status,
)
from sparkd.engine.unit import unit_name  # noqa: E402

sys.path.insert(0, str(REPO / "bench"))
from machine import describe  # noqa: E402

MODEL = "sim-bench"
BODY = json.dumps({"model": MODEL, "max_tokens": 1, "messages": [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hi."}]}).encode()
STREAM_BODY = json.dumps({"model": MODEL, "max_tokens": 4, "stream": True, "messages": [
    {"role": "user", "content": "Say hi."}]}).encode()
SPARKD = [sys.executable, "-c", "from sparkd.main import main; main()"]
# LiteLLM refuses to start without a master key; the other targets ignore the header.
BENCH_KEY = "sk-" + "5a1e" * 16
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {BENCH_KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> str:
    return f"{describe()}, aiohttp {aiohttp.__version__}"


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    return s[min(len(s) - 1, round(p / 100 * (len(s) - 1)))]


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    url: str


@contextlib.contextmanager
def processes() -> Iterator[list[Proc]]:
    procs: list[Proc] = []
    try:
        yield procs
    finally:
        for p in procs:
            p.popen.terminate()
        for p in procs:
            try:
                p.popen.wait(10)
            except subprocess.TimeoutExpired:
                p.popen.kill()
                p.popen.wait()


def spawn(procs: list[Proc], name: str, argv: list[str], url: str, log: Path,
          env: dict[str, str] | None = None) -> Proc:
    out = log.open("wb")
    popen = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             env={**os.environ, **(env or {})}, cwd=REPO)
    p = Proc(name, popen, url)
    procs.append(p)
    return p


async def wait_ready(session: aiohttp.ClientSession, p: Proc, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if p.popen.poll() is not None:
            raise SystemExit(f"{p.name} exited {p.popen.returncode}")
        with contextlib.suppress(aiohttp.ClientError, OSError):
            async with session.post(p.url + "/v1/chat/completions", data=BODY,
                                    headers=HEADERS) as r:
                await r.read()
                if r.status == 200:
                    return
        if time.monotonic() > deadline:
            raise SystemExit(f"{p.name} not ready within {timeout:.0f} s")
        await asyncio.sleep(0.2)


async def one_request(session: aiohttp.ClientSession, url: str) -> float:
    t = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", data=BODY, headers=HEADERS) as r:
        await r.read()
        if r.status != 200:
            raise RuntimeError(f"{url}: HTTP {r.status}")
    return (time.perf_counter() - t) * 1000


async def first_token(session: aiohttp.ClientSession, url: str) -> float:
    t = time.perf_counter()
    async with session.post(url + "/v1/chat/completions", data=STREAM_BODY,
                            headers=HEADERS) as r:
        ttft = 0.0
        async for _chunk in r.content.iter_any():
            if not ttft:
                ttft = (time.perf_counter() - t) * 1000
    return ttft


async def one_client(targets: list[Proc], n: int, *, stream: bool) -> dict[str, list[float]]:
    """Interleaved: request i goes to every target in turn, so drift hits all alike."""
    out: dict[str, list[float]] = {p.name: [] for p in targets}
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as session:
        for p in targets:  # warm up: connections, caches
            for _ in range(50):
                await (first_token if stream else one_request)(session, p.url)
        for _ in range(n):
            for p in targets:
                out[p.name].append(await (first_token if stream else one_request)(session, p.url))
    return out


async def open_loop_slice(session: aiohttp.ClientSession, url: str, rate: float,
                          seconds: float, latencies: list[float]) -> int:
    """Requests sent on a fixed schedule (not when the previous one returns), latency counted
    from the scheduled time so that queueing behind a slow proxy counts (no coordinated
    omission). Returns the errors."""
    errors = 0
    loop = asyncio.get_running_loop()
    start = loop.time() + 0.01

    async def shot(at: float) -> None:
        nonlocal errors
        try:
            async with session.post(url + "/v1/chat/completions", data=BODY,
                                    headers=HEADERS) as r:
                await r.read()
                if r.status != 200:
                    errors += 1
                    return
            latencies.append((loop.time() - at) * 1000)
        except (aiohttp.ClientError, TimeoutError):
            errors += 1

    tasks = []
    for i in range(int(rate * seconds)):
        at = start + i / rate
        delay = at - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(shot(at)))
    await asyncio.gather(*tasks)
    return errors


async def closed_loop_slice(session: aiohttp.ClientSession, url: str, conns: int,
                            seconds: float) -> tuple[int, int, float]:
    """`conns` clients, each sending its next request when the last one returns:
    (answered, errors, elapsed seconds)."""
    done = errors = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def worker() -> None:
        nonlocal done, errors
        while loop.time() < end:
            try:
                await one_request(session, url)
                done += 1
            except (aiohttp.ClientError, TimeoutError, RuntimeError):
                errors += 1

    began = loop.time()
    await asyncio.gather(*(worker() for _ in range(conns)))
    return done, errors, loop.time() - began


async def under_load(targets: list[Proc], *, slices: int, slice_s: float, conns: int = 64,
                     rate: float = 1000, timeout: float = 10) -> dict[str, Any]:
    """The open-loop and throughput phases in short slices, the targets taking turns: the
    interference of a shared machine falls on every target alike. Each target keeps its own
    `conns` connections, opened before the first slice."""
    out: dict[str, Any] = {"open_loop": {}, "throughput": {}}
    sessions = {p.name: aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=conns),
        timeout=aiohttp.ClientTimeout(total=timeout)) for p in targets}
    try:
        for p in targets:
            await asyncio.gather(*(one_request(sessions[p.name], p.url) for _ in range(conns)))
        lat: dict[str, list[float]] = {p.name: [] for p in targets}
        errs = dict.fromkeys(lat, 0)
        for _ in range(slices):
            for p in targets:
                errs[p.name] += await open_loop_slice(sessions[p.name], p.url, rate, slice_s,
                                                      lat[p.name])
                await asyncio.sleep(0.2)  # let stragglers finish before the next target
        for name in lat:
            out["open_loop"][name] = {"p50": pct(lat[name], 50), "p99": pct(lat[name], 99),
                                      "p999": pct(lat[name], 99.9), "errors": errs[name],
                                      "ok": len(lat[name])}
        # name -> (answered, errors, elapsed seconds), summed over the slices
        totals: dict[str, tuple[int, int, float]] = {p.name: (0, 0, 0.0) for p in targets}
        for _ in range(slices):
            for p in targets:
                done, e, elapsed = await closed_loop_slice(sessions[p.name], p.url, conns,
                                                           slice_s)
                t = totals[p.name]
                totals[p.name] = (t[0] + done, t[1] + e, t[2] + elapsed)
                await asyncio.sleep(0.2)
        for name, (done, e, elapsed) in totals.items():
            out["throughput"][name] = {"rps": done / elapsed, "errors": e}
    finally:
        for session in sessions.values():
            await session.close()
    return out


@contextlib.asynccontextmanager
async def fake_daemon(sock: Path, engine_port: int) -> AsyncIterator[None]:
    # What the daemon says, built with the schema's own constructors.
    status = Status(
        daemon=DaemonRecord(state="running", status_line=f"{MODEL}: serving, healthy", pid=1,
                            version="bench", uptime_s=1.0, started_at=0.0, config="bench",
                            systemd_version=252),
        desired_model=MODEL, active_model=MODEL, last_good_model=MODEL,
        engines=(EngineRecord(
            model=MODEL, engine="sim", variant="plain", unit=unit_name(MODEL),
            port=engine_port, load_state="loaded", active_state="active",
            sub_state="running", main_pid=1, n_restarts=0, result="success",
            health=HealthRecord(ok=True, status=200, error=None, latency_ms=1.0)),),
    )

    async def handle(_request: Request) -> Any:
        return status.to_json()

    done = asyncio.Event()

    async def stream(_request: Request) -> AsyncIterator[Any]:
        yield Event(event="snapshot", status=status).to_json()
        await done.wait()

    server = ControlServer(sock, group="root", handler=handle, streams={"subscribe": stream})
    await server.start()
    try:
        yield
    finally:
        done.set()
        await asyncio.sleep(0.1)
        await server.close()


def litellm_python(venv: Path) -> Path | None:
    python = venv / "bin" / "python"
    if (venv / "bin" / "litellm").exists():
        return python
    print(f"installing litellm[proxy] into {venv} (once) ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    r = subprocess.run([str(python), "-m", "pip", "install", "-q", "litellm[proxy]"], check=False)
    return python if r.returncode == 0 else None


def litellm_version(venv: Path) -> str:
    r = subprocess.run([str(venv / "bin" / "python"), "-c",
                        "import importlib.metadata as m; print(m.version('litellm'))"],
                       capture_output=True, text=True, check=False)
    return r.stdout.strip() or "?"


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="gwbench"))
    sock = work / "control.sock"
    engine_port, gw_port, min_port, ll_port = (free_port() for _ in range(4))
    (work / "sparkd.toml").write_text(f"""
[daemon]
control_socket = "{sock}"
[gateway]
listen = "127.0.0.1:{gw_port}"
[models.{MODEL}]
engine = "sim"
port = {engine_port}
role_policy = "strict"
""")
    (work / "litellm.yaml").write_text(f"""
model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: http://127.0.0.1:{engine_port}/v1
      api_key: none
litellm_settings:
  drop_params: true
  telemetry: false
general_settings:
  master_key: {BENCH_KEY}
""")
    py = sys.executable
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    results: dict[str, Any] = {"machine": machine(),
                               "load": Path("/proc/loadavg").read_text().split()[0]}
    with processes() as procs:
        direct = spawn(procs, "direct", [*SPARKD, "sim-engine", "--model", MODEL,
                                         "--path", str(work / "model"), "--port",
                                         str(engine_port), "--load-seconds", "0",
                                         "--tokens-per-second", "1000000"],
                       f"http://127.0.0.1:{engine_port}", work / "engine.log", env)
        async with fake_daemon(sock, engine_port):
            gateway = spawn(procs, "gateway", [*SPARKD, "gateway", "--config",
                                               str(work / "sparkd.toml")],
                            f"http://127.0.0.1:{gw_port}", work / "gateway.log", env)
            minimal = spawn(procs, "minimal", [py, str(REPO / "bench" / "minimal_proxy.py"),
                                               str(min_port), direct.url],
                            f"http://127.0.0.1:{min_port}", work / "minimal.log", env)
            litellm = None
            ll_py = None if args.no_litellm else litellm_python(Path(args.litellm_venv))
            if ll_py is not None:
                results["litellm_version"] = litellm_version(Path(args.litellm_venv))
                litellm = spawn(procs, "litellm", [str(ll_py.parent / "litellm"), "--config",
                                                   str(work / "litellm.yaml"), "--host",
                                                   "127.0.0.1", "--port", str(ll_port),
                                                   "--num_workers", "1"],
                                f"http://127.0.0.1:{ll_port}", work / "litellm.log",
                                {"LITELLM_LOCAL_MODEL_COST_MAP": "True",
                                 "LITELLM_LOG": "ERROR", "LITELLM_TELEMETRY": "False"})
            async with aiohttp.ClientSession() as s:
                for p in procs:
                    await wait_ready(s, p, 120 if p.name == "litellm" else 20)
            fast = [direct, minimal, gateway]
            n = 300 if args.quick else 3000
            slices = 2 if args.quick else args.slices
            print(f"one client: {n} requests to each target, interleaved ...", flush=True)
            results["one_client"] = summarize(await one_client(fast, n, stream=False))
            print(f"first streamed token: {n // 2} streams to each, interleaved ...", flush=True)
            results["ttft"] = summarize(await one_client(fast, n // 2, stream=True))
            print(f"1,000 req/s open loop, then 64-connection throughput: {slices} slices of"
                  " 1 s per target, taking turns ...", flush=True)
            results.update(await under_load(fast, slices=slices, slice_s=1.0))
            if litellm is not None:
                # Last: an overrun LiteLLM keeps working off its backlog after the clients
                # gave up, which would slow whatever ran next.
                print("LiteLLM: the same phases, fewer requests (it is slow) ...", flush=True)
                ll: dict[str, Any] = {
                    "one_client": summarize(await one_client([litellm], n // 20, stream=False)),
                    "ttft": summarize(await one_client([litellm], n // 40, stream=True)),
                }
                ll.update(await under_load([litellm], slices=min(3, slices), slice_s=1.0))
                results["litellm"] = ll
    return results


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {k: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)} for k, v in samples.items()}


def verdicts(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    oc, tt, ol, tp = r["one_client"], r["ttft"], r["open_loop"], r["throughput"]

    def added(kind: dict[str, Any], name: str, key: str) -> float:
        return float(kind[name][key] - kind["direct"][key])

    ratio = tp["gateway"]["rps"] / tp["minimal"]["rps"]
    errors = ol["gateway"]["errors"] + tp["gateway"]["errors"]
    return [
        ("added latency p50, one client <= 0.5 ms", f"{added(oc, 'gateway', 'p50'):.3f} ms",
         f"minimal proxy {added(oc, 'minimal', 'p50'):.3f} ms", added(oc, "gateway", "p50") <= 0.5),
        ("added latency p99, one client <= 2 ms", f"{added(oc, 'gateway', 'p99'):.3f} ms",
         f"minimal proxy {added(oc, 'minimal', 'p99'):.3f} ms", added(oc, "gateway", "p99") <= 2),
        ("added p99 at 1,000 req/s open loop, 64 connections <= 5 ms",
         f"{added(ol, 'gateway', 'p99'):.2f} ms (p99 {ol['gateway']['p99']:.2f} ms vs direct"
         f" {ol['direct']['p99']:.2f} ms; {errors} errors)",
         f"minimal proxy {added(ol, 'minimal', 'p99'):.2f} ms",
         added(ol, "gateway", "p99") <= 5 and errors == 0),
        ("time to first token within 0.2 ms of direct (p50)",
         f"+{added(tt, 'gateway', 'p50'):.3f} ms",
         f"minimal proxy +{added(tt, 'minimal', 'p50'):.3f} ms",
         added(tt, "gateway", "p50") <= 0.2),
        ("throughput at 64 connections >= 0.8x minimal proxy",
         f"{tp['gateway']['rps']:.0f} req/s = {ratio:.2f}x",
         f"minimal proxy {tp['minimal']['rps']:.0f} req/s, direct {tp['direct']['rps']:.0f}",
         ratio >= 0.8),
    ]


def report(r: dict[str, Any]) -> str:
    lines = [f"Machine: {r['machine']}. Shared with other work while it ran (load average"
             f" {r.get('load', '?')} before the run).", ""]
    lines.append("| bar | gateway, measured | beside it in the same run | result |")
    lines.append("| --- | --- | --- | --- |")
    for bar, measured, beside, ok in verdicts(r):
        lines.append(f"| {bar} | {measured} | {beside} | {'met' if ok else 'NOT MET'} |")
    lines.append("")
    lines.append("| target | one client p50 / p99 | TTFT p50 | 1,000 req/s open loop p50 / p99 /"
                 " p99.9 (errors) | 64 connections req/s (errors) |")
    lines.append("| --- | --- | --- | --- | --- |")

    def row(name: str, x: dict[str, Any]) -> str:
        oc, tt = x["one_client"][name], x["ttft"][name]
        ol, tp = x["open_loop"][name], x["throughput"][name]
        return (f"| {name} | {oc['p50']:.3f} / {oc['p99']:.3f} ms | {tt['p50']:.3f} ms |"
                f" {ol['p50']:.2f} / {ol['p99']:.2f} / {ol['p999']:.2f} ms ({ol['errors']}) |"
                f" {tp['rps']:.0f} ({tp['errors']}) |")

    for name in ("direct", "minimal", "gateway"):
        lines.append(row(name, r))
    if "litellm" in r:
        lines.append(row("litellm", r["litellm"]))
        lines.append("")
        lines.append(f"LiteLLM {r.get('litellm_version', '?')} proxy, one worker, same upstream,"
                     " measured after the others with fewer requests (errors: 10 s timeouts).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--litellm-venv", default=str(REPO / "build" / "litellm-venv"))
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    parser.add_argument("--slices", type=int, default=10,
                        help="1-second slices per target of the load phases, taking turns")
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    results = asyncio.run(run(args))
    text = report(results)
    print(text)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    if not args.no_record and not args.quick:
        with (REPO / "bench" / "RESULTS.md").open("a") as f:
            f.write(f"\n#### Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                    " (`bench/gateway_bench.py`)\n\n" + text + "\n")
    return 0 if all(ok for *_, ok in verdicts(results)) else 1


if __name__ == "__main__":
    sys.exit(main())
