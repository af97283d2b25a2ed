"""`sparkctl status`: the daemon, the engines, their health and the machine, for a person
(rich tables and colour) or as the daemon's status document with `--json`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sparkd.ctl.exits import run
from sparkd.options import config_option, json_option

if TYPE_CHECKING:
    from rich.console import Console

    from sparkd.control.status import HealthRecord, Status

_STATE_STYLE = {
    "active": "green",
    "activating": "yellow",
    "deactivating": "yellow",
    "reloading": "yellow",
    "failed": "bold red",
    "inactive": "dim",
}


@click.command()
@config_option
@json_option
@click.pass_context
def status(ctx: click.Context, config_file: Path, *, as_json: bool) -> None:
    """Show the daemon, the engines, their health and the machine: a memory bar with the
    floor, pressure, the GPU, the desktop and the watch's last actions (`sparkctl top`
    refreshes it live).

    Exit 0 when the daemon answered, 3 when it is not running, 4 when you may not ask it.
    """

    def go() -> None:
        from sparkd.control import client

        result = client.status(client.socket_path(config_file))
        if as_json:
            click.echo(json.dumps(result.to_json(), indent=2, sort_keys=True))
        else:
            render_status(result, gateway=gateway_unit_state())

    run(ctx, go)


def gateway_unit_state() -> tuple[str, str] | None:
    """sparkd-gateway.service's ActiveState and Result, from systemctl (None without one)."""
    import subprocess

    try:
        out = subprocess.run(["systemctl", "show", "--property=ActiveState,Result",
                              "sparkd-gateway.service"], capture_output=True, text=True,
                             timeout=5, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    props = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    if out.returncode != 0 or "ActiveState" not in props:
        return None
    return props["ActiveState"], props.get("Result", "")


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


def _health(h: HealthRecord | None) -> str:
    if h is None:
        return "[dim]-[/]"
    if h.ok:
        return f"[green]ok[/] {h.latency_ms:.0f} ms"
    return f"[red]{h.status or h.error or 'failing'}[/]"


def render_status(status: Status, console: Console | None = None, *,
                  gateway: tuple[str, str] | None = None) -> None:
    """`gateway`: sparkd-gateway.service's ActiveState and Result (None: not known)."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    d = status.daemon
    console.print(
        f"[bold]sparkd[/] {d.version} · {d.state} · pid {d.pid} · "
        f"up {format_age(d.uptime_s)} · {d.status_line}"
    )
    console.print(
        f"desired [bold]{status.desired_model or '-'}[/] · active "
        f"[bold]{status.active_model or '-'}[/] · last good {status.last_good_model or '-'}"
    )
    swap = status.swap
    if swap:
        console.print(f"[yellow]swap {swap.id} in progress:[/] {swap.from_model or '-'} -> "
                      f"{swap.to}, at {swap.step} ({swap.duration_ms / 1000:.1f} s)")
    failure = status.last_failure
    if failure:
        console.print(f"[red]last failure[/] of {failure.model}: {failure.reason}")
    if d.state_warning:
        console.print(f"[yellow]warning:[/] {d.state_warning}")
    if d.config_refused:
        console.print(f"[red]the config file is refused; running on the last accepted one "
                      f"({d.config}):[/] {d.config_refused}")
    for what, unsaved in (("state", d.state_unsaved), ("accepted config", d.config_unsaved)):
        if unsaved:
            console.print(f"[red]the {what} is not on disk:[/] {unsaved}")
    for style, what, text in (("bold red", "degraded", d.degraded),
                              ("yellow", "on battery", d.on_battery),
                              ("yellow", "swaps refused", d.swaps_paused)):
        if text:  # the udev watch (docs/watch.md)
            console.print(f"[{style}]{what}:[/] {text}")
    if gateway is not None:
        state, result = gateway
        style = "green" if state == "active" else "bold red"
        why = "" if state in ("active", "inactive") else f" ({result})"
        console.print(f"gateway: [{style}]{state}[/]{why}" + (
            "" if state == "active" else
            " · nothing answers clients: sparkctl doctor says how to start it"))
    reload = d.last_reload
    if reload and not reload.ok:
        console.print(f"[red]last config reload failed (previous config kept):[/] "
                      f"{reload.message}")
    table = Table(show_edge=False, header_style="bold")
    for col in ("model", "engine", "unit state", "pid", "restarts", "port", "health"):
        table.add_column(col)
    for e in status.engines:
        style = _STATE_STYLE.get(e.active_state, "")
        state = f"[{style}]{e.active_state}/{e.sub_state}[/]" if style else (
            f"{e.active_state}/{e.sub_state}")
        table.add_row(
            e.model + (" (speculative)" if e.variant == "speculative" else ""),
            e.engine + (f" {e.engine_version}" if e.engine_version else ""),
            state,
            str(e.main_pid or "-"),
            str(e.n_restarts),
            str(e.port),
            _health(e.health),
        )
    console.print(table)
    for e in status.engines:
        if e.note:
            console.print(f"[yellow]{e.model} ({e.variant}):[/] {e.note}")
        if e.engine_version_warning:
            console.print(f"[yellow]{e.model}:[/] {e.engine_version_warning}")
        for fp in e.fingerprints:
            style = {"error": "red", "warning": "yellow"}.get(fp.severity, "dim")
            value = f" = {fp.value}" if fp.value else ""
            console.print(f"[{style}]{e.model}: {fp.id}{value}[/] ({fp.meaning})")
    from sparkd.ctl.machine_view import render_machine

    render_machine(status, console)
