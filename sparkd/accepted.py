"""The config sparkd accepted: a durable copy of the last config file it validated and put
in force, which engines, `sparkd prestart` and a later boot read instead of whatever
/etc/sparkd.toml holds now.

/etc/sparkd.toml stays the administrator's (sparkd never writes it). Every accepted load (start
and reload) writes its text to `STATE_DIR/accepted.toml`, atomically and durably; a load whose
copy cannot be written is not accepted. At start, a file that does not validate is refused
loudly and sparkd runs on the accepted copy; with no copy (a first boot), it fails once with
the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from sparkd.atomic import atomic_write, remove_stale_temps
from sparkd.config import Config, DaemonConfig, load_config
from sparkd.errors import ConfigError


def save_accepted(config: Config) -> Path:
    """Keep `config`'s text as the accepted config. Raises ConfigError when it cannot be
    made durable (the load must then not be accepted)."""
    path = config.daemon.accepted_config
    if config.source == path:
        return path  # running on the copy itself: nothing new to keep
    try:
        atomic_write(path, config.text.encode(), mode=0o644)
    except OSError as exc:
        raise ConfigError(f"cannot keep the accepted config at {path}: {exc}") from exc
    return path


def remove_stale_copies(config: Config) -> list[Path]:
    """Temp files of accepted-config writes that a crash or power cut stopped before their
    rename (the daemon's start calls this: it is the only writer of the copy)."""
    return remove_stale_temps(config.daemon.accepted_config)


@dataclass(frozen=True, slots=True)
class Loaded:
    config: Config
    refused: str | None = None  # why the administrator's file was refused (running on the copy)


def load_or_fall_back(path: Path, *, state_dir: Path | None = None) -> Loaded:
    """The config at `path`; when it does not validate, the accepted copy with the reason.
    Raises ConfigError (with the fix) when there is no usable copy either."""
    try:
        return Loaded(load_config(path))
    except ConfigError as exc:
        refused = exc.message
    copy = DaemonConfig(state_dir=state_dir).accepted_config if state_dir else (
        DaemonConfig().accepted_config)
    if not copy.exists():
        raise ConfigError(f"{refused}\nno accepted config to fall back to ({copy} does not "
                          f"exist yet); fix {path}, then: systemctl reset-failed sparkd; "
                          "systemctl start sparkd")
    try:
        return Loaded(load_config(copy), refused=refused)
    except ConfigError as copy_exc:
        raise ConfigError(f"{refused}\nand the accepted copy is unusable too: "
                          f"{copy_exc.message}; fix {path}, then: systemctl reset-failed "
                          "sparkd; systemctl start sparkd") from None
