"""Click options shared by `sparkd` and `sparkctl`, defined once and stacked on commands."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from sparkd.config import CONFIG_ENV, DEFAULT_CONFIG_PATH

F = TypeVar("F", bound=Callable[..., Any])


def config_option(func: F) -> F:
    """`--config PATH` (also $SPARKD_CONFIG), passed to the command as `config_file`."""
    return click.option(
        "--config",
        "config_file",
        type=click.Path(dir_okay=False, path_type=Path),
        envvar=CONFIG_ENV,
        default=DEFAULT_CONFIG_PATH,
        show_default=True,
        help=f"Configuration file (also ${CONFIG_ENV}).",
    )(func)


def json_option(func: F) -> F:
    """`--json`: machine-readable output with a documented, stable schema."""
    return click.option(
        "--json", "as_json", is_flag=True, default=False, help="Print JSON for scripts."
    )(func)
