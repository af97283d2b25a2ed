"""`sparkctl`: the operator's command line. Human output by default, `--json` for scripts.

Exit statuses are `ExitStatus`; `run()` is the one place that maps errors to them.
Tracebacks only with `--debug`.
"""

from __future__ import annotations

import enum
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import click

from sparkd.config import DEFAULT_CONFIG_PATH, config_path, load_config
from sparkd.engine.plan import SwapFailed, SwapInProgress, SwapRefused
from sparkd.errors import (
    ConfigError,
    DaemonUnreachable,
    PermissionDenied,
    SparkdError,
    UnknownModel,
)
from sparkd.lazy import LazyGroup
from sparkd.options import config_option, json_option


class WaitTimeout(SparkdError):
    """sparkctl stopped waiting for work that goes on in the daemon."""

    code = "timeout"


class ExitStatus(enum.IntEnum):
    OK = 0
    FAILURE = 1
    USAGE = 2  # click's own code for bad arguments
    DAEMON_UNREACHABLE = 3
    PERMISSION_DENIED = 4
    CONFIG_INVALID = 5
    UNKNOWN_MODEL = 6
    SWAP_FAILED = 7  # the swap failed and was rolled back (or the rollback failed)
    SWAP_IN_PROGRESS = 8
    SWAP_REFUSED = 9  # preflight said no; nothing changed
    TIMEOUT = 10  # sparkctl stopped waiting; the work goes on in sparkd


_EXIT_FOR: dict[type[SparkdError], ExitStatus] = {
    DaemonUnreachable: ExitStatus.DAEMON_UNREACHABLE,
    PermissionDenied: ExitStatus.PERMISSION_DENIED,
    ConfigError: ExitStatus.CONFIG_INVALID,
    UnknownModel: ExitStatus.UNKNOWN_MODEL,
    SwapFailed: ExitStatus.SWAP_FAILED,
    SwapInProgress: ExitStatus.SWAP_IN_PROGRESS,
    SwapRefused: ExitStatus.SWAP_REFUSED,
    WaitTimeout: ExitStatus.TIMEOUT,
}


def exit_status_for(exc: SparkdError) -> ExitStatus:
    for cls, status in _EXIT_FOR.items():
        if isinstance(exc, cls) or exc.code == cls.code:
            return status
    return ExitStatus.FAILURE


def _fail(exc: SparkdError, *, debug: bool) -> NoReturn:
    if debug:
        raise exc
    click.echo(f"sparkctl: {exc.message}", err=True)
    sys.exit(exit_status_for(exc))


def run(ctx: click.Context, fn: Callable[[], None]) -> None:
    """Run a command's body, mapping SparkdError to its exit status (the one place)."""
    try:
        fn()
    except SparkdError as exc:
        _fail(exc, debug=bool(ctx.obj and ctx.obj.get("debug")))


def socket_path(config_file: Path | None) -> Path:
    """The control socket named by the config (default /run/sparkd/control.sock).

    A broken config must not cut the operator off from the daemon, which still runs on its
    last good one: warn, and use the default socket.
    """
    from sparkd.config import DaemonConfig

    path = config_path(config_file)
    if not path.exists() and path == DEFAULT_CONFIG_PATH:
        return DaemonConfig().control_socket
    try:
        return load_config(path).daemon.control_socket
    except ConfigError as exc:
        default = DaemonConfig().control_socket
        click.echo(f"sparkctl: warning: {exc.message} (trying {default})", err=True)
        return default


@click.group(
    cls=LazyGroup,
    lazy={
        "swap": "sparkd.cli_swap:swap",
        "recover": "sparkd.cli_swap:recover",
        "logs": "sparkd.cli_logs:logs",
        "rewrite": "sparkd.cli_rewrite:rewrite",
        "pull": "sparkd.store.commands:pull",
        "verify": "sparkd.store.commands:verify",
        "doctor": "sparkd.cli_doctor:doctor",
        "models": "sparkd.cli_models:models",
    },
)
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="sparkd")
@click.pass_context
def cli(ctx: click.Context, *, debug: bool) -> None:
    """Control sparkd, the inference engine supervisor."""
    ctx.obj = {"debug": debug}


@cli.command()
@config_option
@json_option
@click.pass_context
def status(ctx: click.Context, config_file: Path, *, as_json: bool) -> None:
    """Show the daemon, the engines, their health and the machine's memory.

    Exit 0 when the daemon answered, 3 when it is not running, 4 when you may not ask it.
    """

    def go() -> None:
        from sparkd.control.client import call

        result = call(socket_path(config_file), "status")
        if as_json:
            click.echo(json.dumps(result, indent=2, sort_keys=True))
        else:
            from sparkd.cli_output import render_status

            render_status(result)

    run(ctx, go)


@cli.command()
@config_option
@click.option(
    "--render-to",
    type=click.Path(file_okay=False, path_type=Path),
    help="Write the unit files into this directory instead of printing them.",
)
@click.option(
    "--systemd-version",
    type=int,
    help="Render for this systemd version (default: the one installed here).",
)
@click.pass_context
def units(
    ctx: click.Context, config_file: Path, render_to: Path | None, systemd_version: int | None
) -> None:
    """Print (or write) the engine units sparkd generates from the config. No daemon needed."""

    def go() -> None:
        from sparkd.engine.versions import detect_versions
        from sparkd.units.render import render_units

        config = load_config(config_file)
        version = systemd_version or installed_systemd_version()
        # Each unit's header says which engine release it was rendered for.
        rendered = render_units(config, systemd_version=version,
                                engine_versions=detect_versions(config.supervised_models))
        if render_to is None:
            for i, (name, text) in enumerate(sorted(rendered.items())):
                if i:
                    click.echo()
                click.echo(f"# --- {name}")
                click.echo(text, nl=False)
            return
        render_to.mkdir(parents=True, exist_ok=True)
        for name, text in sorted(rendered.items()):
            (render_to / name).write_text(text, encoding="utf-8")
            click.echo(str(render_to / name))

    run(ctx, go)


def installed_systemd_version() -> int:
    """The version of systemctl here (`systemctl --version`), or 252 when there is none."""
    import re
    import subprocess

    try:
        out = subprocess.run(
            ["systemctl", "--version"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return 252
    match = re.match(r"systemd (\d+)", out)
    return int(match.group(1)) if match else 252


def main() -> None:
    cli()
