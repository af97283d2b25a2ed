"""`sparkd gateway-key add NAME`: make an API key for the gateway. The key is printed once (on
stdout, alone on its line); the keys file keeps only its digest (docs/gateway.md, "API keys")."""

from __future__ import annotations

import os
import stat
import sys
from pathlib import Path
from typing import Final

import click

from sparkd.atomic import atomic_write
from sparkd.config import load_config
from sparkd.errors import ConfigError
from sparkd.gateway import auth
from sparkd.options import config_option

DEFAULT_KEYS_FILE: Final = Path("/etc/sparkd/gateway-keys.toml")
EXIT_ERROR: Final = 2


def _keys_file(config_file: Path, explicit: Path | None) -> Path:
    if explicit is not None:
        return explicit.absolute()
    try:
        configured = load_config(config_file).gateway.keys_file
    except ConfigError:
        configured = None
    return configured or DEFAULT_KEYS_FILE


def _read(path: Path) -> tuple[str, int, int | None]:
    """The file's text, the mode to keep (0600 for a new file) and its group."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return "", 0o600, None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot open: {exc.strerror} (a symlink is refused)"
                          ) from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        text = f.read().decode("utf-8")
    mode = stat.S_IMODE(st.st_mode)
    return text, (mode if not mode & 0o027 else 0o600), st.st_gid


@click.group("gateway-key")
def command() -> None:
    """The gateway's API keys."""


@command.command("add")
@config_option
@click.argument("name")
@click.option("--file", "file", type=click.Path(dir_okay=False, path_type=Path),
              help="The keys file (default: gateway.keys_file, else "
              f"{DEFAULT_KEYS_FILE}).")
@click.option("--model", "models", multiple=True,
              help="A model the key may use (repeat; default: every model).")
@click.option("--rate-per-minute", type=click.FloatRange(min=0, min_open=True, max=1e9),
              help="Requests a minute on average (default: no limit).")
@click.option("--burst", type=click.FloatRange(min=0, min_open=True, max=1e9),
              help="Requests at once (default: the rate per minute).")
def add(config_file: Path, name: str, file: Path | None, models: tuple[str, ...],
        rate_per_minute: float | None, burst: float | None) -> None:
    """Make key NAME: print it once, store its digest."""
    path = _keys_file(config_file, file)
    try:
        text, mode, gid = _read(path)
        secret, digest = auth.new_key()
        new = auth.add_entry(text, name, digest, models=models,
                             rate_per_minute=rate_per_minute, burst=burst)
        atomic_write(path, new.encode(), mode=mode)
        if gid is not None and os.geteuid() == 0:
            os.chown(path, 0, gid)
    except (ConfigError, UnicodeDecodeError, OSError) as exc:
        click.echo(f"{path}: {getattr(exc, 'message', exc)}", err=True)
        sys.exit(EXIT_ERROR)
    click.echo(f"key {name!r} added to {path} (its digest only). The key, shown this once:",
               err=True)
    click.echo(secret)
    click.echo("Then: systemctl reload sparkd-gateway", err=True)
