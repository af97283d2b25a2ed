"""Shell completion of model names: the `[models.NAME]` tables of the configuration file.

click completes commands and options itself (the package's bash completion script is
click's own, generated at build time: packaging/build-deb.sh). This adds the model names,
read from the file that the command would read (`--config`, else $SPARKD_CONFIG, else
/etc/sparkd.toml). Completion must never fail or print: a missing, unreadable or broken
file completes nothing. Only the TOML is parsed, not validated, so a config that sparkd
refuses still completes its names (the operator is probably about to fix it).
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import click
from click.shell_completion import CompletionItem

from sparkd.config import config_path


def model_names(path: Path) -> list[str]:
    """The names of the [models.NAME] tables in the TOML file at path; [] when there are none
    or the file cannot be read or parsed."""
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError):
        return []
    models = data.get("models")
    if not isinstance(models, dict):
        return []
    return sorted(name for name, table in models.items() if isinstance(table, dict))


def complete_model(
    ctx: click.Context, param: click.Parameter, incomplete: str
) -> list[CompletionItem]:
    """click's shell_complete= for a model NAME argument or option."""
    explicit = ctx.params.get("config_file")
    path = explicit if isinstance(explicit, Path) else config_path()
    return [CompletionItem(name) for name in model_names(path) if name.startswith(incomplete)]
