"""`sparkctl doctor`: the runbook's checks, each with the fix; exit 1 when any fails."""

from __future__ import annotations

import json
from pathlib import Path

import click

from sparkd.cli import ExitStatus, run
from sparkd.config import load_config
from sparkd.options import config_option, json_option

_MARK = {"ok": ("ok", "green"), "warn": ("warn", "yellow"), "fail": ("FAIL", "red")}


@click.command()
@config_option
@json_option
@click.pass_context
def doctor(ctx: click.Context, config_file: Path, *, as_json: bool) -> None:
    """Check this machine against the runbook: the daemon, the units, the pinned vLLM MoE
    backend, each model's memory and weights, role policies, drop_caches, NVML.

    Exit 0 when nothing fails (warnings allowed), 1 when a check fails.
    """

    def go() -> None:
        from sparkd.doctor import Level, diagnose, gather

        checks = diagnose(gather(load_config(config_file)))
        if as_json:
            click.echo(json.dumps([c.to_json() for c in checks], indent=2))
        else:
            for c in checks:
                word, colour = _MARK[c.level.value]
                click.echo(f"{click.style(f'{word:>4}', fg=colour)}  {c.message}")
                if c.fix:
                    click.echo(f"      fix: {c.fix}")
        if any(c.level is Level.FAIL for c in checks):
            ctx.exit(ExitStatus.FAILURE)

    run(ctx, go)
