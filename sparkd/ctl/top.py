"""`sparkctl top`: `sparkctl status`, refreshed live (rich.live) until Ctrl-C.

On a terminal the screen is redrawn in place; otherwise (a pipe, a file) each refresh is
printed after the last, separated by a blank line, as `top -b` does. It asks the daemon for
its status once per `--interval` over the control socket, the same request `sparkctl status`
makes. When the daemon goes away it says so and exits with status 3 (sparkd.ctl.exits);
Ctrl-C exits 0.
"""

from __future__ import annotations

import io
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sparkd.ctl.exits import run
from sparkd.errors import DaemonUnreachable
from sparkd.options import config_option

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from sparkd.control.status import Status


def frame(status: Status, console: Console, gateway: tuple[str, str] | None) -> Text:
    """One screen: what `sparkctl status` prints, drawn for `console`."""
    from rich.console import Console
    from rich.text import Text

    from sparkd.ctl.status import render_status

    buf = io.StringIO()
    render_status(status, Console(file=buf, width=console.width, force_terminal=True,
                                  color_system="truecolor" if console.color_system else None,
                                  no_color=console.no_color),
                  gateway=gateway)
    return Text.from_ansi(buf.getvalue().rstrip("\n"))


def watch(ask: Callable[[], Status], console: Console, *, interval_s: float,
          count: int | None, gateway: Callable[[], tuple[str, str] | None],
          sleep: Callable[[float], None] = time.sleep) -> int:
    """Refresh until Ctrl-C or `count` frames; returns the number of frames shown. Raises
    DaemonUnreachable when the daemon stops answering (the first ask included)."""
    from rich.live import Live

    shown = 0
    if not console.is_terminal:
        while count is None or shown < count:
            if shown:
                sleep(interval_s)
            text = frame(ask(), console, gateway())
            console.print(text, end="\n\n")
            shown += 1
        return shown
    with Live(console=console, auto_refresh=False, screen=False,
              redirect_stdout=False, redirect_stderr=False) as live:
        while count is None or shown < count:
            if shown:
                sleep(interval_s)
            live.update(frame(ask(), console, gateway()), refresh=True)
            shown += 1
    return shown


def _finite(_ctx: click.Context, _param: click.Parameter, value: float) -> float:
    """FloatRange lets NaN through (every comparison with it is false): time.sleep(nan)
    was a ValueError traceback after the first refresh."""
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a number of seconds (0.1 to 86400)")
    return value


@click.command()
@config_option
@click.option("--interval", "interval_s", type=click.FloatRange(min=0.1, max=86400),
              default=2.0, show_default=True, callback=_finite,
              help="Seconds between refreshes (0.1 to 86400).")
@click.option("--count", type=click.IntRange(min=1), default=None,
              help="Stop after this many refreshes (default: until Ctrl-C).")
@click.pass_context
def top(ctx: click.Context, config_file: Path, *, interval_s: float, count: int | None) -> None:
    """Show `sparkctl status` refreshed live: the engines, the memory bar, pressure, the GPU,
    the desktop and the watch's last actions. Ctrl-C leaves.

    Exit 0 on Ctrl-C or after --count refreshes, 3 when the daemon is not running or goes
    away, 4 when you may not ask it.
    """

    def go() -> None:
        from rich.console import Console

        from sparkd.control import client
        from sparkd.ctl.status import gateway_unit_state

        path = client.socket_path(config_file)
        shown = 0

        def ask() -> Status:
            nonlocal shown
            try:
                result = client.status(path)
            except DaemonUnreachable as exc:
                if shown == 0:
                    raise
                raise DaemonUnreachable(f"sparkd went away: {exc.message}") from None
            shown += 1
            return result

        try:
            watch(ask, Console(), interval_s=interval_s, count=count,
                  gateway=gateway_unit_state)
        except KeyboardInterrupt:
            return

    run(ctx, go)
