"""`sparkctl`: the operator's command line. Human output by default, `--json` for scripts.

The root group only: each command family is a module of its own in this package, imported when
its command runs (`sparkctl status` must start fast). Exit statuses: `sparkd.ctl.exits`.
Tracebacks only with `--debug`.
"""

from __future__ import annotations

import click

from sparkd.ctl import exits
from sparkd.lazy import LazyGroup


@click.group(
    cls=LazyGroup,
    lazy={
        "status": "sparkd.ctl.status:status",
        "top": "sparkd.ctl.top:top",
        "units": "sparkd.ctl.units:units",
        "swap": "sparkd.ctl.swap:swap",
        "recover": "sparkd.ctl.swap:recover",
        "logs": "sparkd.ctl.logs:logs",
        "rewrite": "sparkd.ctl.rewrite:rewrite",
        "pull": "sparkd.ctl.store:pull",
        "verify": "sparkd.ctl.store:verify",
        "doctor": "sparkd.ctl.doctor:doctor",
        "models": "sparkd.ctl.models:models",
    },
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="sparkd")
@click.pass_context
def cli(ctx: click.Context, *, debug: bool) -> None:
    """Control sparkd, the inference engine supervisor."""
    ctx.obj = {"debug": debug}


def main() -> None:
    exits.main(cli)
