"""PURE: `[daemon] metrics_listen`, where sparkd serves its Prometheus metrics
(docs/watch.md "Shown and exported"), kept out of sparkd.config (near its size limit).

Empty (the default) turns the endpoint off. Otherwise HOST:PORT on loopback only: the
endpoint has no authentication, and it names the models and the machine's state. A scraper on
another machine goes through something that authenticates (a reverse proxy, an SSH tunnel, a
Prometheus agent on this machine)."""

from __future__ import annotations

import ipaddress
from typing import Any, Final

from sparkd.config_checks import Validator

KEY: Final = "daemon.metrics_listen"
EXAMPLE: Final = '"127.0.0.1:9471"'


def split_listen(listen: str) -> tuple[str, int]:
    """("127.0.0.1", 9471) from "127.0.0.1:9471"; "[::1]:9471" gives ("::1", 9471)."""
    host, _, port = listen.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def parse_metrics_listen(v: Validator, t: dict[str, Any], default: str) -> str:
    listen = v.string(t, KEY, default)
    if listen == "":
        return ""
    host, sep, port = listen.rpartition(":")
    # ASCII digits only: int() would take full-width ones ("\uff19\uff14" binds port 94).
    digits = port.isascii() and port.isdigit()
    if not sep or not host or not digits or not 0 < int(port) < 65536:
        v.fail(KEY, f'HOST:PORT such as {EXAMPLE}, or "" for no metrics endpoint', listen)
    if not is_loopback(host.strip("[]")):
        v.fail(KEY, f"a loopback address such as {EXAMPLE} (the endpoint has no "
               "authentication: let a Prometheus agent on this machine or an SSH tunnel carry "
               "it further), or \"\" for none", listen)
    return listen
