"""`sparkd gateway`: run the gateway (started by sparkd-gateway.service)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from pathlib import Path

import click
from aiohttp import web

from sparkd.accepted import load_or_fall_back
from sparkd.config import load_config
from sparkd.errors import ConfigError
from sparkd.journal import event, setup_logging
from sparkd.options import config_option

log = logging.getLogger(__name__)

EXIT_CONFIG = 2
EXIT_LISTEN = 1


def _notify(state: str) -> None:
    from sparkd.systemd.notify import SdNotifier

    SdNotifier().notify(state)


def reload_config(app: web.Application, config_file: Path) -> None:
    """SIGHUP: the new config when it is valid; the one in force (and a loud error) if not."""
    from sparkd.gateway.app import apply_config
    from sparkd.gateway.auth import check_keys

    try:
        config = load_config(config_file)
        keys = check_keys(config)
        fixed = apply_config(app, config, keys=keys)
    except ConfigError as exc:
        event(log, "gateway_config_rejected", "new config rejected, keeping the previous "
              "one: %s", exc.message, level=logging.ERROR)
        _notify("STATUS=config reload failed, previous config kept")
        return
    event(log, "gateway_config_reloaded", "config %s reloaded%s", config_file,
          f" ({', '.join(fixed)} need a restart of the gateway)" if fixed else "")
    _notify(f"STATUS=serving on {config.gateway.listen}")


async def _run(config_file: Path) -> int:
    from sparkd.gateway.app import serve

    loaded = load_or_fall_back(config_file)
    config = loaded.config
    if loaded.refused:
        event(log, "gateway_config_refused", "%s is refused; serving on the last accepted "
              "config (%s): %s", config_file, config.source, loaded.refused,
              level=logging.ERROR)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)

    def on_app(app: web.Application) -> None:
        loop.add_signal_handler(signal.SIGHUP, reload_config, app, config_file)

    try:
        await serve(config, ready=lambda: _notify(
            f"READY=1\nSTATUS=serving on {config.gateway.listen}"), stop=stop, on_app=on_app)
    except OSError as exc:
        log.error("gateway cannot listen on %s: %s", config.gateway.listen, exc)
        return EXIT_LISTEN
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
    _notify("STOPPING=1")
    return 0


def _runner() -> asyncio.Runner:
    """uvloop's loop when it is installed (a dependency): a proxy's cost is mostly the loop's
    and the sockets'; the standard loop otherwise."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - installed with sparkd
        return asyncio.Runner()
    return asyncio.Runner(loop_factory=uvloop.new_event_loop)


@click.command("gateway")
@config_option
@click.option("--debug", is_flag=True, help="Log debug messages (each rewrite's roles).")
def command(config_file: Path, *, debug: bool) -> None:
    """Run the OpenAI-compatible gateway in front of sparkd's engines."""
    setup_logging("sparkd-gateway", debug=debug)
    try:
        with _runner() as runner:
            code = runner.run(_run(config_file))
        sys.exit(code)
    except ConfigError as exc:
        log.error("%s", exc.message)
        sys.exit(EXIT_CONFIG)
