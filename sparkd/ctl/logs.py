"""`sparkctl logs`: sparkd's events and the engines' output, from journald field matches.

The selection is journalctl's own (`SPARKD_EVENT=...`, `SPARKD_MODEL=...`, units), never a
parse of message text; this module only builds the argv (pure) and renders the entries.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from typing import Any, Final

import click

from sparkd.ctl.exits import run
from sparkd.errors import SparkdError

UNITS: Final = ("sparkd.service", "sparkd-gateway.service", "sparkd-engine@*.service")
KEPT_FIELDS: Final = (
    "__REALTIME_TIMESTAMP", "_SYSTEMD_UNIT", "PRIORITY", "MESSAGE", "SPARKD_EVENT",
    "SPARKD_MODEL", "SPARKD_FROM", "SPARKD_TO", "SPARKD_STEP", "SPARKD_DURATION_MS",
    "SPARKD_SWAP", "SPARKD_FINGERPRINT",
)


def journal_argv(
    *, event: str | None, model: str | None, since: str | None, follow: bool, lines: int
) -> list[str]:
    """PURE: the journalctl command for a selection. Field matches AND together; without an
    event or model, the units of sparkd and its engines."""
    argv = ["journalctl", "-o", "json", "--no-pager", "--all"]
    if since:
        argv.append(f"--since={since}")
    elif not follow:
        argv += ["-b", f"--lines={lines}"]
    if follow:
        argv += ["--follow", f"--lines={lines}"]
    if event:
        argv.append(f"SPARKD_EVENT={event}")
    if model:
        argv.append(f"SPARKD_MODEL={model}")
    if not event and not model:
        for unit in UNITS:
            argv += ["-u", unit]
    return argv


def entry(raw: Mapping[str, Any]) -> dict[str, Any]:
    """PURE: the fields a person or a script wants, with the time as ISO 8601 (UTC)."""
    kept = {k.lstrip("_").lower(): raw[k] for k in KEPT_FIELDS[1:] if k in raw}
    usec = int(raw.get("__REALTIME_TIMESTAMP", 0))
    kept["time"] = dt.datetime.fromtimestamp(usec / 1e6, dt.UTC).isoformat(timespec="milliseconds")
    message = kept.get("message")
    if isinstance(message, list):  # journald sends non-UTF-8 text as bytes
        kept["message"] = bytes(message).decode(errors="replace")
    return kept


def timeline_line(e: Mapping[str, Any]) -> str:
    """PURE: one line of the timeline for a person."""
    clock = str(e.get("time", ""))[11:23]
    ev = e.get("sparkd_event")
    who = e.get("sparkd_model") or str(e.get("systemd_unit", "")).removesuffix(".service")
    took = e.get("sparkd_duration_ms")
    tail = f"  ({float(took):.0f} ms)" if took else ""
    if tail and tail.strip() in str(e.get("message", "")):
        tail = ""  # the message says it already
    label = ev or "output"
    return f"{clock}  {label:<18} {who:<18} {e.get('message', '')}{tail}"


def _style(line: str, priority: str | None) -> str:
    if priority is not None and priority.isdigit() and int(priority) <= 3:
        return click.style(line, fg="red")
    if priority == "4":
        return click.style(line, fg="yellow")
    return line


def render(lines: Iterable[str], *, as_json: bool) -> None:
    for text in lines:
        try:
            e = entry(json.loads(text))
        except ValueError:
            continue
        if as_json:
            click.echo(json.dumps(e, sort_keys=True))
        else:
            click.echo(_style(timeline_line(e), e.get("priority")))
        sys.stdout.flush()


@click.command()
@click.option("--event", help="Only this event (swap_done, rollback, engine_hung, ...).")
@click.option("--model", help="Only this model: sparkd's events about it and its engine's output.")
@click.option("--since", help="Since this time (journalctl syntax: '10 min ago', '09:00').")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new entries.")
@click.option("-n", "--lines", default=200, show_default=True, help="At most this many entries.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per entry.")
@click.pass_context
def logs(
    ctx: click.Context,
    event: str | None,
    model: str | None,
    since: str | None,
    lines: int,
    *,
    follow: bool,
    as_json: bool,
) -> None:
    """sparkd's events and the engines' output as a timeline with durations."""

    def go() -> None:
        argv = journal_argv(event=event, model=model, since=since, follow=follow, lines=lines)
        try:
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:
            raise SparkdError("journalctl is not installed: sparkctl logs reads journald") from None
        assert proc.stdout is not None
        try:
            render(proc.stdout, as_json=as_json)
        except KeyboardInterrupt:
            pass
        finally:
            proc.terminate()
            proc.wait()

    run(ctx, go)


__all__ = ["entry", "journal_argv", "logs", "timeline_line"]
