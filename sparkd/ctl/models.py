"""`sparkctl models`: every configured model, its files' state and whether it serves.

The files' state comes from the manifest and a stat of the model directory, no hashing
(`sparkd.store.listing`); no daemon is needed for it. When the daemon answers, each model also
gets its unit's state and whether it is the active (or desired) model; when it does not, the
listing still comes, with the reason in place of that column (exit 0 all the same: the files
are what this command is for, `sparkctl status` is the one that fails without a daemon).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sparkd.config import Config, ModelConfig, load_config
from sparkd.ctl.exits import run
from sparkd.errors import SparkdError
from sparkd.options import config_option, json_option

if TYPE_CHECKING:
    from sparkd.control.status import Status

GIB = 1 << 30

# What to run for a state (the human output's hint column).
NEXT_STEP = {
    "changed": "sparkctl verify {name}",
    "incomplete": "sparkctl pull {name}",
    "bad": "sparkctl verify {name} --repair",
    "unknown": "sparkctl pull {name}",
}


def next_step(model: ModelConfig, state: str, *, stale: bool = False) -> str | None:
    """The command that settles the files' state (None: nothing to do, or nothing sparkctl
    can do: without a `source` there is nowhere to pull or repair from)."""
    if stale:
        return f"sparkctl pull {model.name}"
    if state in ("incomplete", "unknown", "bad") and model.source is None:
        return None
    step = NEXT_STEP.get(state)
    return None if step is None else step.format(name=model.name)


def daemon_view(config_file: Path | None) -> tuple[Status | None, str | None]:
    """(the daemon's status, None) or (None, why there is none)."""
    from sparkd.control import client

    try:
        return client.status(client.socket_path(config_file), timeout_s=5.0), None
    except SparkdError as exc:
        return None, exc.message


def model_entry(
    config: Config, model: ModelConfig, status: Status | None
) -> dict[str, Any]:
    from sparkd.store.listing import model_files
    from sparkd.store.model import requested_revision

    entry: dict[str, Any] = {
        "name": model.name,
        "engine": model.engine,
        "port": model.port,
        "memory_gib": model.memory_gib,
        "source": model.source,
        "requested_revision": requested_revision(model) if model.source else model.revision,
        "path": None if model.engine == "external" else str(model.path),
        "files": (files := model_files(config, model)).to_json(),
        "next": next_step(model, files.state, stale=files.stale),
        "unit": None,
        "active": None,
        "desired": None,
    }
    if status is not None:
        unit = status.engine(model.unit_name)
        entry["unit"] = None if unit is None else {
            "name": model.unit_name,
            "active_state": unit.active_state,
            "sub_state": unit.sub_state,
        }
        entry["active"] = status.active_model == model.name
        entry["desired"] = status.desired_model == model.name
    return entry


def _files_cell(files: dict[str, Any]) -> str:
    state = files["state"]
    style = {"verified": "green", "changed": "yellow", "incomplete": "yellow", "bad": "bold red",
             "unknown": "dim", "external": "dim"}[state]
    stale = " [yellow](stale manifest)[/]" if files["stale"] else ""
    if state in ("unknown", "external"):
        return f"[{style}]{state}[/]{stale}"
    detail = f"{files['ok']}/{files['files']} ok"
    for key in ("changed", "missing", "bad"):
        if files[key]:
            detail += f", {files[key]} {key}"
    return f"[{style}]{state}[/] ({detail}){stale}"


def _size_cell(files: dict[str, Any]) -> str:
    if files["state"] in ("unknown", "external"):
        return "-"
    have, want = files["present_bytes"] / GIB, files["expected_bytes"] / GIB
    return f"{want:.1f} GiB" if have == want else f"{have:.1f} of {want:.1f} GiB"


def render(entries: list[dict[str, Any]], daemon_error: str | None) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(show_edge=False, header_style="bold")
    for col in ("model", "engine", "files", "size", "revision", "serving", "next"):
        table.add_column(col)
    for e in entries:
        files = e["files"]
        if daemon_error is not None:
            serving = "[dim]?[/]"
        elif e["active"]:
            serving = "[green]active[/]"
        elif e["unit"] is not None and e["unit"]["active_state"] not in (None, "inactive"):
            serving = f"{e['unit']['active_state']}/{e['unit']['sub_state']}"
        else:
            serving = "[dim]-[/]"
        if e["desired"] and not e["active"]:
            serving += " (desired)"
        revision = (files.get("revision") or "")[:12] or "-"
        hint = e["next"] or ""
        table.add_row(escape(e["name"]), e["engine"], _files_cell(files), _size_cell(files),
                      revision, serving, escape(hint))
    console.print(table)
    for e in entries:
        if e["files"]["note"] and (e["files"]["state"] == "unknown" or e["files"]["stale"]):
            console.print(f"[dim]{escape(e['name'])}: {escape(e['files']['note'])}[/]")
    if daemon_error is not None:
        console.print(f"[yellow]sparkd did not answer ({escape(daemon_error)}): serving state "
                      "unknown[/]")


@click.command()
@config_option
@json_option
@click.pass_context
def models(ctx: click.Context, config_file: Path, *, as_json: bool) -> None:
    """List the configured models: files verified or not (no hashing), size, revision, and
    whether each serves (when sparkd answers).

    Exit 0; 5 when the config is invalid.
    """

    def go() -> None:
        config = load_config(config_file)
        status, daemon_error = daemon_view(config_file)
        entries = [model_entry(config, m, status) for _, m in sorted(config.models.items())]
        if as_json:
            click.echo(json.dumps({"models": entries, "daemon": {
                "reachable": status is not None, "error": daemon_error}}, indent=2,
                sort_keys=True))
        else:
            render(entries, daemon_error)

    run(ctx, go)
