"""`sparkctl units`: the engine units sparkd generates from the config (no daemon needed)."""

from __future__ import annotations

from pathlib import Path

import click

from sparkd.config import load_config
from sparkd.ctl.exits import run
from sparkd.options import config_option


@click.command()
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
        from sparkd.monitor.nvml import compute_capability
        from sparkd.systemd.version import installed_systemd_version
        from sparkd.units.render import render_units

        config = load_config(config_file)
        version = systemd_version or installed_systemd_version()
        # Each unit's header says which engine release it was rendered for.
        rendered = render_units(config, systemd_version=version,
                                engine_versions=detect_versions(config.supervised_models),
                                capability=compute_capability().value)
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
