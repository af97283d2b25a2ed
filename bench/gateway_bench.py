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
import platform
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
    cpu = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    distro = ""
    with contextlib.suppress(OSError):
        distro = "Debian " + Path("/etc/debian_version").read_text().strip()
    return (f"{cpu}, {os.cpu_count()} cores, {distro}, Python {platform.python_version()},"
            f" aiohttp {aiohttp.__version__}")


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


async def open_loop(url: str, rate: float, seconds: float, conns: int, timeout: float
                    ) -> tuple[list[float], int, int]:
    """Requests sent on a fixed schedule (not when the previous one returns); latency counted
    from the scheduled time, so queueing behind a slow proxy is counted (no coordinated
    omission)."""
    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=conns)
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(connector=connector, timeout=client_timeout) as session:
        for _ in range(conns):  # open the connections first
            await one_request(session, url)
        loop = asyncio.get_running_loop()
        start = loop.time() + 0.05
        total = int(rate * seconds)

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
        for i in range(total):
            at = start + i / rate
            delay = at - loop.time()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(shot(at)))
        await asyncio.gather(*tasks)
        achieved = total / max(1e-9, loop.time() - start)
    return latencies, errors, int(achieved)


async def closed_loop(url: str, conns: int, seconds: float, timeout: float
                      ) -> tuple[float, int, float]:
    """`conns` clients, each sending its next request when the last one returns."""
    done = errors = 0
    latencies: list[float] = []
    connector = aiohttp.TCPConnector(limit=conns)
    async with aiohttp.ClientSession(connector=connector,
                                     timeout=aiohttp.ClientTimeout(total=timeout)) as session:
        loop = asyncio.get_running_loop()
        end = loop.time() + seconds

        async def worker() -> None:
            nonlocal done, errors
            while loop.time() < end:
                try:
                    latencies.append(await one_request(session, url))
                    done += 1
                except (aiohttp.ClientError, TimeoutError, RuntimeError):
                    errors += 1

        began = loop.time()
        await asyncio.gather(*(worker() for _ in range(conns)))
        elapsed = loop.time() - began
    return done / elapsed, errors, pct(latencies, 50)


@contextlib.asynccontextmanager
async def fake_daemon(sock: Path, engine_port: int) -> AsyncIterator[None]:
    status = {"schema": 1, "active_model": MODEL, "swap": None, "engines": [{
        "model": MODEL, "engine": "sim", "port": engine_port, "active_state": "active",
        "health": {"ok": True}}]}

    async def handle(_request: Request) -> Any:
        return status

    done = asyncio.Event()

    async def stream(_request: Request) -> AsyncIterator[Any]:
        yield {"event": "snapshot", "status": status}
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
    env = {"PYTHONPATH": str(REPO)}
    results: dict[str, Any] = {"machine": machine()}
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
            rounds = 1 if args.quick else args.rounds
            n = 200 if args.quick else 600
            secs = 2.0 if args.quick else 3.0
            results["rounds"] = []
            for i in range(rounds):
                print(f"round {i + 1}/{rounds}: one client ({n} requests each, interleaved),"
                      f" first tokens ({n // 2}), 1000 req/s open loop and 64-connection"
                      f" throughput ({secs:g} s each)", flush=True)
                results["rounds"].append(await measure(fast, n, secs))
            if litellm is not None:
                # Last: a LiteLLM overrun keeps working off its backlog after the clients
                # gave up, which would slow whatever ran next.
                print("LiteLLM: the same phases, once (fewer requests: it is slow) ...",
                      flush=True)
                results["litellm"] = await measure([litellm], max(20, n // 10), secs)
    return results


async def measure(targets: list[Proc], n: int, secs: float) -> dict[str, Any]:
    r: dict[str, Any] = {
        "one_client": summarize(await one_client(targets, n, stream=False)),
        "ttft": summarize(await one_client(targets, n // 2, stream=True)),
        "open_loop": {}, "throughput": {},
    }
    for p in targets:
        await asyncio.sleep(0.5)
        lat, errs, achieved = await open_loop(p.url, 1000, secs, 64, timeout=10)
        r["open_loop"][p.name] = {"p50": pct(lat, 50), "p99": pct(lat, 99), "errors": errs,
                                  "ok": len(lat), "sent_per_s": achieved}
    for p in targets:
        await asyncio.sleep(0.5)
        rps, errs, p50 = await closed_loop(p.url, 64, secs, timeout=10)
        r["throughput"][p.name] = {"rps": rps, "errors": errs, "p50": p50}
    return r


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {k: {"p50": pct(v, 50), "p99": pct(v, 99), "n": len(v)} for k, v in samples.items()}


def figures(r: dict[str, Any]) -> dict[str, float]:
    """One round's bar figures (gateway and minimal proxy, each against direct)."""
    oc, tt, ol, tp = r["one_client"], r["ttft"], r["open_loop"], r["throughput"]
    out: dict[str, float] = {}
    for name in ("gateway", "minimal"):
        out[f"{name}_add50"] = oc[name]["p50"] - oc["direct"]["p50"]
        out[f"{name}_add99"] = oc[name]["p99"] - oc["direct"]["p99"]
        out[f"{name}_ol99"] = ol[name]["p99"] - ol["direct"]["p99"]
        out[f"{name}_ttft"] = tt[name]["p50"] - tt["direct"]["p50"]
        out[f"{name}_errors"] = ol[name]["errors"] + tp[name]["errors"]
    out["ratio"] = tp["gateway"]["rps"] / tp["minimal"]["rps"]
    return out


def median(values: list[float]) -> float:
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def verdicts(r: dict[str, Any]) -> list[tuple[str, str, str, bool]]:
    per_round = [figures(x) for x in r["rounds"]]

    def m(key: str) -> float:
        return median([f[key] for f in per_round])

    def spread(key: str, unit: str = " ms") -> str:
        vals = [f[key] for f in per_round]
        return f"{m(key):.3f}{unit} (rounds: {min(vals):.3f} to {max(vals):.3f})"

    errors = sum(f["gateway_errors"] for f in per_round)
    return [
        ("added latency p50, one client <= 0.5 ms", spread("gateway_add50"),
         f"minimal proxy {m('minimal_add50'):.3f} ms", m("gateway_add50") <= 0.5),
        ("added latency p99, one client <= 2 ms", spread("gateway_add99"),
         f"minimal proxy {m('minimal_add99'):.3f} ms", m("gateway_add99") <= 2.0),
        ("added p99 at 1,000 req/s open loop, 64 connections <= 5 ms", spread("gateway_ol99"),
         f"minimal proxy {m('minimal_ol99'):.3f} ms; gateway errors {errors:.0f}",
         m("gateway_ol99") <= 5.0 and errors == 0),
        ("time to first token within 0.2 ms of direct (p50)", spread("gateway_ttft"),
         f"minimal proxy {m('minimal_ttft'):.3f} ms", m("gateway_ttft") <= 0.2),
        ("throughput at 64 connections >= 0.8x minimal proxy", spread("ratio", "x"),
         "req/s in the table below", m("ratio") >= 0.8),
    ]


def report(r: dict[str, Any]) -> str:
    rounds = r["rounds"]
    lines = [f"Machine: {r['machine']}. {len(rounds)} rounds; each figure is the median over"
             " the rounds (the range beside it).", ""]
    lines.append("| bar | gateway, measured | beside it in the same run | result |")
    lines.append("| --- | --- | --- | --- |")
    for bar, measured, beside, ok in verdicts(r):
        lines.append(f"| {bar} | {measured} | {beside} | {'met' if ok else 'NOT MET'} |")
    lines.append("")
    lines.append("| target | one client p50 / p99 | TTFT p50 | 1,000 req/s open loop p50 / p99"
                 " (errors) | 64 connections req/s (errors) |")
    lines.append("| --- | --- | --- | --- | --- |")

    def row(name: str, rs: list[dict[str, Any]]) -> str:
        def med(kind: str, key: str) -> float:
            return median([x[kind][name][key] for x in rs])

        return (f"| {name} | {med('one_client', 'p50'):.3f} / {med('one_client', 'p99'):.3f} ms"
                f" | {med('ttft', 'p50'):.3f} ms | {med('open_loop', 'p50'):.2f} /"
                f" {med('open_loop', 'p99'):.2f} ms ({med('open_loop', 'errors'):.0f}) |"
                f" {med('throughput', 'rps'):.0f} ({med('throughput', 'errors'):.0f}) |")

    for name in ("direct", "minimal", "gateway"):
        lines.append(row(name, rounds))
    if "litellm" in r:
        lines.append(row("litellm", [r["litellm"]]))
        lines.append("")
        lines.append(f"LiteLLM {r.get('litellm_version', '?')} proxy, one worker, same upstream,"
                     " measured once after the rounds (errors: timeouts at 10 s).")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--litellm-venv", default=str(REPO / "build" / "litellm-venv"))
    parser.add_argument("--no-litellm", action="store_true")
    parser.add_argument("--quick", action="store_true", help="short phases (a smoke run)")
    parser.add_argument("--rounds", type=int, default=5,
                        help="rounds of all phases (medians over them: this machine is shared)")
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
            f.write(f"\n### Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                    " (`bench/gateway_bench.py`)\n\n" + text + "\n")
    return 0 if all(ok for *_, ok in verdicts(results)) else 1


if __name__ == "__main__":
    sys.exit(main())
