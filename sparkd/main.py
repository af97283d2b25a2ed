"""`sparkd`: the daemon and the helpers its units run (prestart, wait-healthy, sim-engine)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from sparkd.config import Config, load_config
from sparkd.errors import ConfigError, SparkdError
from sparkd.lazy import LazyGroup
from sparkd.options import config_option

EXIT_CONFIG_INVALID = 2


@click.group(
    cls=LazyGroup,
    lazy={
        "daemon": "sparkd.daemon.application:command",
        "prestart": "sparkd.engine.prestart:command",
        "wait-healthy": "sparkd.engine.health:wait_healthy_command",
        "sim-engine": "sparkd.sim.engine:command",
        "gateway": "sparkd.gateway.command:command",
        "gateway-key": "sparkd.gateway.keys_command:command",
    },
)
@click.version_option(package_name="sparkd")
def cli() -> None:
    """sparkd: supervisor for LLM inference engines on a DGX Spark."""


@cli.command("check-config")
@config_option
def check_config(config_file: Path) -> None:
    """Validate the configuration: exit 0 when valid, 2 with the reason when not."""
    try:
        config = load_config(config_file)
        render_check(config)
        from sparkd.gateway.auth import check_keys

        check_keys(config)
    except ConfigError as exc:
        click.echo(exc.message, err=True)
        sys.exit(EXIT_CONFIG_INVALID)
    names = ", ".join(config.models) or "no models"
    click.echo(f"{config_file}: OK ({names})")


@cli.command("reload")
@config_option
def reload(config_file: Path) -> None:
    """Reload the config in the running sparkd and wait for the outcome: exit 0 when it is in
    force, 2 with the reason when it is refused (the previous config stays). Used by
    `systemctl reload sparkd` (ExecReload=), so a refused config fails the reload."""
    from sparkd.control import client

    # No check here first: sparkd checks, and records a refusal where status and doctor show it.
    try:
        result = client.call(client.socket_path(config_file), "reload", timeout_s=600)
    except SparkdError as exc:
        if exc.code == ConfigError.code:
            click.echo(f"refused, the previous config stays in force: {exc.message}",
                       err=True)
            sys.exit(EXIT_CONFIG_INVALID)
        raise
    click.echo(f"{result['config']}: in force ({', '.join(result['models']) or 'no models'})")


def render_check(config: Config) -> None:
    """What parsing cannot check: the units systemd would refuse (binaries, ...), and every
    model's engine command line against the real parser of its release
    (sparkd.engine.linecheck): errors raise, warnings are printed."""
    from sparkd.engine.linecheck import refuse_bad_lines
    from sparkd.engine.versions import detect_versions
    from sparkd.monitor.nvml import compute_capability
    from sparkd.systemd.version import installed_systemd_version
    from sparkd.units.render import render_units

    versions = detect_versions(config.supervised_models)
    capability = compute_capability().value
    for warning in refuse_bad_lines(config, versions, capability).warnings:
        click.echo(f"warning: {warning}", err=True)
    render_units(config, systemd_version=installed_systemd_version(),
                 engine_versions=versions, capability=capability)


def main() -> None:
    """`sparkd`: an error that escapes a command leaves with its status and one line, not a
    traceback (2 for an invalid config, as check-config, 1 otherwise)."""
    try:
        cli.main(standalone_mode=True)
    except ConfigError as exc:
        click.echo(f"sparkd: {exc.message}", err=True)
        sys.exit(EXIT_CONFIG_INVALID)
    except SparkdError as exc:
        click.echo(f"sparkd: {exc.message}", err=True)
        sys.exit(1)
