"""sparkctl's exit statuses, and the one place that maps errors to them (as httpie does).

Subcommands import `run` from here, never sparkctl's root group. `main` wraps the whole
program once, so an error that escapes a command still leaves with its status.
"""

from __future__ import annotations

import enum
import sys
from collections.abc import Callable
from typing import NoReturn

import click

from sparkd.errors import (
    ConfigError,
    DaemonUnreachable,
    PermissionDenied,
    SparkdError,
    SwapFailed,
    SwapInProgress,
    SwapRefused,
    UnknownModel,
    WaitTimeout,
)


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


def fail(exc: SparkdError, *, debug: bool) -> NoReturn:
    if debug:
        raise exc
    click.echo(f"sparkctl: {exc.message}", err=True)
    sys.exit(exit_status_for(exc))


def run(ctx: click.Context, fn: Callable[[], None]) -> None:
    """Run a command's body, mapping SparkdError to its exit status."""
    try:
        fn()
    except SparkdError as exc:
        fail(exc, debug=bool(ctx.find_root().obj and ctx.find_root().obj.get("debug")))


def main(group: click.Group) -> None:
    """Run sparkctl: the mapping also catches what escapes a command (`--debug` shows it)."""
    try:
        group.main(standalone_mode=True)
    except SparkdError as exc:
        fail(exc, debug="--debug" in sys.argv[1:])
