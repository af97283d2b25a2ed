"""Bar (issue 10): while 1,000 hostile connections hit the gateway on loopback, a well-behaved
client's p99 chat completion through it stays under 50 ms and the gateway's RSS under 200 MB.

One run, against the simulated engine (`sparkd sim-engine`, a test double answering at 10^6
tokens/s) behind `sparkd gateway` (the engine as an `external` model with role_policy =
"strict", so no daemon is needed; routing is the same table lookup as for a sparkd-managed
one), with the descriptor limit and environment of its unit (LimitNOFILE=16384,
MALLOC_MMAP_THRESHOLD_):

1. idle: the well-behaved client alone, sequential chat completions on one keep-alive
   connection, for `--seconds`;
2. hostile: the same client while 1,000 hostile connections are held open, each one of:
   - slow headers (slowloris): a request line, then a header byte every second;
   - slow bodies: headers announcing 1 MiB, then a body byte every second;
   - maximal inputs (`--maximal-share` of the connections, 10 %): a chat completion as large
     as the classifier and the rewrite have to take: a 64 KiB `def NAME` line without its
     closing colon (the classifier's code-line pattern), 4,000 and 20,000 same-role messages
     (the strict policy's merge; 4,000 is under the default gateway.max_messages), each sent
     again when the last one is answered, after a pause (`--maximal-pause`, 5 s).
   A hostile connection the gateway closes (its timeouts) is opened again at once, so 1,000
   stay open for the whole phase.

The well-behaved client runs in a process of its own (the hostile load generator's event
loop must not delay its clock). The gateway's RSS (with its worker process's, where it has
one) is sampled every 0.2 s; CPU is counted for the gateway (and worker), the engine and the
load generator. Every loop is
bounded by the phase's deadline; everything stays on loopback.

    python bench/gateway_hostile.py [--seconds 15] [--mix slow,body,maximal] [--no-record]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
sys.path.insert(0, str(REPO))

from gateway_bench import (  # noqa: E402
    BODY,
    HEADERS,
    MODEL,
    SPARKD,
    free_port,
    machine,
    pct,
    processes,
    spawn,
    wait_ready,
)

HOSTILE = 1000
NOFILE = 16384  # units/sparkd-gateway.service LimitNOFILE=
P99_BAR_MS = 50.0
RSS_BAR_MB = 200.0
KINDS = ("slow", "body", "maximal")


def unit_environment() -> dict[str, str]:
    """The Environment= lines of units/sparkd-gateway.service: the gateway runs as there."""
    unit = (REPO / "units" / "sparkd-gateway.service").read_text()
    pairs = (line.removeprefix("Environment=").split("=", 1) for line in unit.splitlines()
             if line.startswith("Environment="))
    return {k: v for k, v in pairs}


def maximal_bodies() -> list[bytes]:
    """The classifier's and the rewrite's worst inputs of issue 10 item 1, as chat bodies."""
    line = "def " + "a" * 65_536  # 64 KiB of `def NAME` without its colon

    def same_role(n: int) -> list[dict[str, str]]:
        return [{"role": "user", "content": f"part {i}"} for i in range(n)]

    # 4,000 messages: under the default gateway.max_messages (4,096), so rewritten in full;
    # 20,000: the figure, past it.
    return [json.dumps({"model": MODEL, "max_tokens": 1, "messages": m}).encode() for m in (
        [{"role": "user", "content": line}], same_role(4_000), same_role(20_000))]


async def slow_headers(port: int, deadline: float, stats: dict[str, int]) -> None:
    while time.monotonic() < deadline:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            stats["connect_errors"] += 1
            await asyncio.sleep(0.5)
            continue
        stats["slow_headers_opened"] += 1
        try:
            w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            while time.monotonic() < deadline and not w.is_closing():
                await asyncio.sleep(1.0)
                w.write(b"X")
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.transport.abort()


async def slow_body(port: int, deadline: float, stats: dict[str, int]) -> None:
    while time.monotonic() < deadline:
        try:
            r, w = await asyncio.open_connection("127.0.0.1", port, limit=1 << 16)
        except OSError:
            stats["connect_errors"] += 1
            await asyncio.sleep(0.5)
            continue
        stats["slow_bodies_opened"] += 1
        try:
            w.write(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                    b"Content-Type: application/json\r\nContent-Length: 1048576\r\n\r\n{")
            while time.monotonic() < deadline and not w.is_closing() and not r.at_eof():
                # Once the gateway answers (408) and closes, a write fails: open again.
                await asyncio.sleep(1.0)
                w.write(b" ")
                await w.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            w.transport.abort()


async def maximal(session: aiohttp.ClientSession, url: str, body: bytes, deadline: float,
                  pause: float, stats: dict[str, int]) -> None:
    while time.monotonic() < deadline:
        try:
            async with session.post(url + "/v1/chat/completions", data=body,
                                    headers=HEADERS) as r:
                answer = await r.read()
                code = ""
                if r.status != 200:
                    with contextlib.suppress(ValueError, KeyError, TypeError):
                        code = "_" + str(json.loads(answer)["error"]["code"])
                stats[f"maximal_{r.status}{code}"] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            stats[f"maximal_{type(exc).__name__}"] += 1
        await asyncio.sleep(pause)


async def hostile(url: str, port: int, seconds: float, mix: tuple[str, ...], pause: float,
                  share: float, started: asyncio.Event) -> dict[str, int]:
    from collections import defaultdict

    stats: dict[str, int] = defaultdict(int)
    deadline = time.monotonic() + seconds
    bodies = maximal_bodies()
    session = aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, force_close=True),
        timeout=aiohttp.ClientTimeout(total=seconds + 30))
    tasks = []
    try:
        maximal_every = max(1, round(1 / share)) if "maximal" in mix else 0
        others = [k for k in mix if k != "maximal"] or ["maximal"]
        n_maximal = 0
        for i in range(HOSTILE):
            kind = "maximal" if maximal_every and i % maximal_every == 0 else (
                others[i % len(others)])
            if kind == "slow":
                tasks.append(asyncio.create_task(slow_headers(port, deadline, stats)))
            elif kind == "body":
                tasks.append(asyncio.create_task(slow_body(port, deadline, stats)))
            else:
                tasks.append(asyncio.create_task(maximal(
                    session, url, bodies[n_maximal % len(bodies)], deadline, pause, stats)))
                n_maximal += 1
            if i % 100 == 99:
                await asyncio.sleep(0.05)  # ramp up over half a second
        stats["connections"] = len(tasks)
        started.set()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await session.close()
    return dict(stats)


def client_process(url: str, seconds: float) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, __file__, "--client", url, "--seconds",
                             str(seconds)], stdout=subprocess.PIPE, cwd=REPO)


async def run_client(url: str, seconds: float) -> None:
    """The well-behaved client (its own process): latencies in ms, as JSON on stdout."""
    out: list[float] = []
    errors = 0
    end = time.monotonic() + seconds
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1)) as session:
        for _ in range(50):  # warm-up (counted as errors when it fails)
            try:
                async with session.post(url + "/v1/chat/completions", data=BODY,
                                        headers=HEADERS,
                                        timeout=aiohttp.ClientTimeout(total=10)) as r:
                    await r.read()
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
            if time.monotonic() > end:
                break
        while time.monotonic() < end:
            t = time.perf_counter()
            try:
                async with session.post(url + "/v1/chat/completions", data=BODY,
                                        headers=HEADERS,
                                        timeout=aiohttp.ClientTimeout(total=10)) as r:
                    await r.read()
                    ok = r.status == 200
            except (aiohttp.ClientError, TimeoutError):
                ok = False
            if ok:
                out.append((time.perf_counter() - t) * 1000)
            else:
                errors += 1
            await asyncio.sleep(0.005)  # about 150 requests a second
    print(json.dumps({"latencies": out, "errors": errors}))


def family(pid: int) -> list[int]:
    """The process and its children (the gateway's worker process, where there is one)."""
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return [pid]
    return [pid, *(int(c) for c in children)]


def rss_mb(pid: int, *, children: bool = True) -> float:
    """The RSS of the process (and its children)."""
    total = 0.0
    for p in family(pid) if children else [pid]:
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


def cpu_s(pid: int) -> float:
    """CPU seconds of the process and its children (live ones, and those it waited for)."""
    total = 0.0
    for i, p in enumerate(family(pid)):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += int(fields[11]) + int(fields[12])
        if i == 0:
            total += int(fields[13]) + int(fields[14])
    return total / os.sysconf("SC_CLK_TCK")


async def measure(url: str, pid: int, seconds: float, engine: int) -> dict[str, Any]:
    peak = main_peak = 0.0
    cpu0, t0, engine0 = cpu_s(pid), time.monotonic(), cpu_s(engine)
    self0 = time.process_time()
    client = client_process(url, seconds)
    try:
        while client.poll() is None:
            peak = max(peak, rss_mb(pid))
            main_peak = max(main_peak, rss_mb(pid, children=False))
            await asyncio.sleep(0.2)
        stdout = client.stdout.read() if client.stdout else b""
    finally:
        if client.poll() is None:
            client.kill()
        client.wait()
    elapsed = time.monotonic() - t0
    cpu = (cpu_s(pid) - cpu0) / elapsed
    data = json.loads(stdout)
    lat = data["latencies"]
    return {"p50": pct(lat, 50), "p99": pct(lat, 99), "max": max(lat, default=float("nan")),
            "n": len(lat), "errors": data["errors"], "rss_peak_mb": peak,
            "rss_main_peak_mb": main_peak,
            "gateway_cpu": cpu, "engine_cpu": (cpu_s(engine) - engine0) / elapsed,
            "generator_cpu": (time.process_time() - self0) / elapsed}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="gwhostile"))
    sock = work / "control.sock"
    engine_port, gw_port = free_port(), free_port()
    (work / "sparkd.toml").write_text(f"""
[daemon]
control_socket = "{sock}"
[gateway]
listen = "127.0.0.1:{gw_port}"
{args.gateway}
[models.{MODEL}]
engine = "external"
url = "http://127.0.0.1:{engine_port}"
role_policy = "strict"
""")
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    gateway_env = {**env, **unit_environment()}
    limited = [sys.executable, "-c", "import resource; resource.setrlimit("
               f"resource.RLIMIT_NOFILE, ({NOFILE}, {NOFILE})); from sparkd.main import main;"
               " main()"]
    mix = tuple(args.mix.split(","))
    results: dict[str, Any] = {"machine": machine(),
                               "load": Path("/proc/loadavg").read_text().split()[0],
                               "mix": mix, "seconds": args.seconds,
                               "maximal": (args.maximal_share, args.maximal_pause),
                               "gateway": args.gateway}
    with processes() as procs:
        engine = spawn(procs, "engine", [*SPARKD, "sim-engine", "--model", MODEL, "--path",
                                str(work / "model"), "--port", str(engine_port),
                                "--load-seconds", "0", "--tokens-per-second", "1000000"],
              f"http://127.0.0.1:{engine_port}", work / "engine.log", env)
        gateway = spawn(procs, "gateway", [*limited, "gateway", "--config",
                                           str(work / "sparkd.toml")],
                        f"http://127.0.0.1:{gw_port}", work / "gateway.log", gateway_env)
        async with aiohttp.ClientSession() as s:
            for p in procs:
                await wait_ready(s, p, 30)
        pid = gateway.popen.pid
        results["rss_start_mb"] = rss_mb(pid)
        print(f"idle: the client alone for {args.seconds:g} s ...", flush=True)
        results["idle"] = await measure(gateway.url, pid, args.seconds, engine.popen.pid)
        print(f"hostile: {HOSTILE} connections ({', '.join(mix)}) and the client for"
              f" {args.seconds:g} s ...", flush=True)
        started = asyncio.Event()
        attack = asyncio.create_task(hostile(gateway.url, gw_port, args.seconds + 8, mix,
                                             args.maximal_pause, args.maximal_share,
                                             started))
        await started.wait()
        await asyncio.sleep(2)  # every hostile connection open
        results["hostile"] = await measure(gateway.url, pid, args.seconds, engine.popen.pid)
        results["hostile"]["open_fds"] = len(os.listdir(f"/proc/{pid}/fd"))
        results["attack"] = await attack
        results["alive"] = gateway.popen.poll() is None
        results["log_bytes"] = (work / "gateway.log").stat().st_size
    return results


def verdicts(r: dict[str, Any]) -> list[tuple[str, str, bool]]:
    h, i = r["hostile"], r["idle"]
    p99 = (f"{h['p99']:.2f} ms (idle {i['p99']:.2f} ms: {h['p99'] / i['p99']:.1f}x;"
           f" {h['errors']} errors)" if h["n"] else
           f"no answer in {r['seconds']:g} s ({h['errors']} requests timed out after 10 s)")
    return [
        ("well-behaved client's p99 under 1,000 hostile connections < 50 ms", p99,
         bool(h["n"]) and h["p99"] < P99_BAR_MS and h["errors"] == 0),
        ("gateway RSS under 1,000 hostile connections < 200 MB",
         f"{h['rss_peak_mb']:.0f} MB peak with its worker process, {h['rss_main_peak_mb']:.0f}"
         f" MB without (idle {i['rss_peak_mb']:.0f} MB)",
         h["rss_peak_mb"] < RSS_BAR_MB),
    ]


def report(r: dict[str, Any]) -> str:
    h, i = r["hostile"], r["idle"]
    share, pause = r["maximal"]
    maximal = (f" ({share:.0%} of the connections maximal inputs, each every {pause:g} s)"
               if "maximal" in r["mix"] else "")
    lines = [f"Machine: {r['machine']}. Load average {r['load']} before the run. Hostile mix:"
             f" {', '.join(r['mix'])}{maximal}; {r['seconds']:g} s per phase."
             + (f" Config: `{r['gateway']}`." if r["gateway"] else ""), "",
             "| bar | measured | result |", "| --- | --- | --- |"]
    lines += [f"| {bar} | {m} | {'met' if ok else 'NOT MET'} |" for bar, m, ok in verdicts(r)]
    lines += ["", "| phase | p50 | p99 | max | requests (errors) | gateway RSS peak |"
              " CPU (of one core): gateway / engine / hostile generator |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, x in (("idle", i), ("hostile", h)):
        lines.append(f"| {name} | {x['p50']:.2f} ms | {x['p99']:.2f} ms | {x['max']:.1f} ms |"
                     f" {x['n']} ({x['errors']}) | {x['rss_peak_mb']:.0f} MB |"
                     f" {x['gateway_cpu']:.0%} / {x['engine_cpu']:.0%} /"
                     f" {x['generator_cpu']:.0%} |")
    a = r["attack"]
    lines += ["", f"p99 ratio hostile/idle {h['p99'] / i['p99']:.1f}x. Hostile side: "
              + ", ".join(f"{k} {v}" for k, v in sorted(a.items()))
              + f". Gateway descriptors open at the end: {h['open_fds']}; its log:"
              f" {r['log_bytes']} bytes; still serving: {r['alive']}."]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--mix", default=",".join(KINDS),
                        help="hostile kinds, comma-separated: slow, body, maximal")
    parser.add_argument("--maximal-pause", type=float, default=5.0,
                        help="seconds a maximal-input connection waits between requests")
    parser.add_argument("--maximal-share", type=float, default=0.1,
                        help="share of the hostile connections sending maximal inputs")
    parser.add_argument("--gateway", default="",
                        help='[gateway] lines for the config, e.g. "body_memory_bytes = 1e8"')
    parser.add_argument("--client", help=argparse.SUPPRESS)
    parser.add_argument("--no-record", action="store_true", help="do not append to RESULTS.md")
    args = parser.parse_args()
    import uvloop  # a sparkd dependency: the load generator's own cost stays low

    if args.client:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(run_client(args.client, args.seconds))
        return 0
    if any(k not in KINDS for k in args.mix.split(",")):
        parser.error(f"--mix: kinds are {', '.join(KINDS)}")
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        results = runner.run(run(args))
    text = report(results)
    print(text)
    if not args.no_record:
        with (REPO / "bench" / "RESULTS.md").open("a") as f:
            f.write(f"\n#### Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}"
                    " (`bench/gateway_hostile.py`)\n\n" + text + "\n")
    return 0 if all(ok for *_, ok in verdicts(results)) else 1


if __name__ == "__main__":
    sys.exit(main())
