"""sparkctl's output for a person: rich tables and colour (never used with --json)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

GIB = 1 << 30

_STATE_STYLE = {
    "active": "green",
    "activating": "yellow",
    "deactivating": "yellow",
    "reloading": "yellow",
    "failed": "bold red",
    "inactive": "dim",
}


def _gib(n: Any) -> str:
    return f"{n / GIB:.1f} GiB" if isinstance(n, int | float) else "?"


def format_age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, s = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{s:02d}s"
    hours, m = divmod(minutes, 60)
    if hours < 48:
        return f"{hours}h{m:02d}m"
    return f"{hours // 24}d{hours % 24:02d}h"


def _health(h: dict[str, Any] | None) -> str:
    if h is None:
        return "[dim]-[/]"
    if h.get("ok"):
        return f"[green]ok[/] {h.get('latency_ms', 0):.0f} ms"
    return f"[red]{h.get('status') or h.get('error') or 'failing'}[/]"


def render_status(status: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    d = status["daemon"]
    console.print(
        f"[bold]sparkd[/] {d['version']} · {d['state']} · pid {d['pid']} · "
        f"up {format_age(d['uptime_s'])} · {d['status_line']}"
    )
    console.print(
        f"desired [bold]{status['desired_model'] or '-'}[/] · active "
        f"[bold]{status['active_model'] or '-'}[/] · last good {status['last_good_model'] or '-'}"
    )
    swap = status.get("swap")
    if swap:
        console.print(f"[yellow]swap {swap['id']} in progress:[/] {swap['from'] or '-'} -> "
                      f"{swap['to']}, at {swap['step']} ({swap['duration_ms'] / 1000:.1f} s)")
    failure = status.get("last_failure")
    if failure:
        console.print(f"[red]last failure[/] of {failure['model']}: {failure['reason']}")
    if d.get("state_warning"):
        console.print(f"[yellow]warning:[/] {d['state_warning']}")
    reload = d.get("last_reload")
    if reload and not reload["ok"]:
        console.print(f"[red]last config reload failed (previous config kept):[/] "
                      f"{reload['message']}")
    table = Table(show_edge=False, header_style="bold")
    for col in ("model", "engine", "unit state", "pid", "restarts", "port", "health"):
        table.add_column(col)
    for e in status["engines"]:
        style = _STATE_STYLE.get(e["active_state"], "")
        state = f"[{style}]{e['active_state']}/{e['sub_state']}[/]" if style else (
            f"{e['active_state']}/{e['sub_state']}")
        table.add_row(
            e["model"] + (" (speculative)" if e.get("variant") == "speculative" else ""),
            e["engine"] + (f" {e['engine_version']}" if e.get("engine_version") else ""),
            state,
            str(e["main_pid"] or "-"),
            str(e["n_restarts"]),
            str(e["port"]),
            _health(e.get("health")),
        )
    console.print(table)
    for e in status["engines"]:
        if e.get("note"):
            console.print(f"[yellow]{e['model']} ({e.get('variant', 'plain')}):[/] {e['note']}")
        if e.get("engine_version_warning"):
            console.print(f"[yellow]{e['model']}:[/] {e['engine_version_warning']}")
        for fp in e.get("fingerprints", []):
            style = {"error": "red", "warning": "yellow"}.get(fp["severity"], "dim")
            value = f" = {fp['value']}" if fp.get("value") else ""
            console.print(f"[{style}]{e['model']}: {fp['id']}{value}[/] ({fp['meaning']})")
    mem = status.get("memory", {})
    if "error" in mem:
        console.print(f"memory: [red]{mem['error']}[/]")
    else:
        console.print(
            f"memory: {_gib(mem.get('available_bytes'))} available of "
            f"{_gib(mem.get('total_bytes'))}, page cache {_gib(mem.get('page_cache_bytes'))}"
            + (f" [dim]· {mem['accounting']}[/]" if mem.get("accounting") else "")
        )
    pressure = status.get("pressure") or {}
    if pressure:
        parts = [f"{name} {p['some_avg10']:.1f}%" + (f"/{p['full_avg10']:.1f}%"
                 if "full_avg10" in p else "") for name, p in sorted(pressure.items())]
        console.print("pressure (some/full avg10): " + ", ".join(parts))
    gpu = status.get("gpu")
    if gpu and gpu.get("error"):
        console.print(f"gpu: [dim]{gpu['error']}[/]")
    for g in (gpu or {}).get("gpus", []):
        used = (f"{_gib(g['memory_used_bytes'])} of {_gib(g['memory_total_bytes'])}"
                if g.get("memory_total_bytes") is not None else "memory: unified")
        util = "?" if g.get("utilization_pct") is None else f"{g['utilization_pct']}%"
        console.print(f"gpu {g['index']}: {g['name']}, {used}, busy {util}, "
                      f"{len(g['processes'])} process(es) using {_gib(g['process_bytes'])}")
