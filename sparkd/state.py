"""Durable state in /var/lib/sparkd/state.toml: desired and last good model, boot bookkeeping.

`parse_state` and `render_state` are pure; `StateStore` owns the file. A state file that does
not parse is renamed aside (`state.toml.corrupt-<UTC time>`), reported, and sparkd starts from
the config's default model: the evidence is kept and there is no crash loop. The file is
written by `atomic_write` (temp file, fsync, rename, directory fsync): after a power cut it is
the old or the new state, never a mix (tests/unit/test_crash_consistency.py).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import logging
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomli_w

from sparkd.atomic import atomic_write, remove_stale_temps
from sparkd.errors import StateError

log = logging.getLogger(__name__)

STATE_FILE = "state.toml"
SCHEMA = 1


@dataclass(frozen=True, slots=True)
class State:
    desired_model: str | None = None
    last_good_model: str | None = None
    # The boot this state was last written in, and whether sparkd stopped cleanly in it: a
    # previous boot without a clean stop is an unclean shutdown (power cut, crash).
    boot_id: str | None = None
    clean_shutdown: bool = False
    # A swap in flight (kept so that a sparkd killed mid-swap converges after its restart).
    swap_to: str | None = None
    swap_from: str | None = None
    swap_step: str | None = None
    # The last failed swap or crash loop, for `sparkctl status`.
    last_failure_model: str | None = None
    last_failure_reason: str | None = None
    # The number of the last swap: numbers stay unique across sparkd restarts.
    last_swap_id: int = 0

    def replace(self, **changes: Any) -> State:
        return dataclasses.replace(self, **changes)


_FIELDS = {f.name: f for f in dataclasses.fields(State)}


def parse_state(text: str) -> State:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StateError(f"not valid TOML: {exc}") from None
    schema = raw.pop("schema", SCHEMA)
    if schema != SCHEMA:
        raise StateError(f"schema {schema!r} is not {SCHEMA}")
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key not in _FIELDS:
            raise StateError(f"unknown key {key!r}")
        expected: type = {"clean_shutdown": bool, "last_swap_id": int}.get(key, str)
        if not isinstance(value, expected) or (expected is int and isinstance(value, bool)):
            raise StateError(f"{key}: expected {expected.__name__}, got {value!r}")
        values[key] = value
    return State(**values)


def render_state(state: State) -> str:
    data: dict[str, Any] = {"schema": SCHEMA}
    for key, value in dataclasses.asdict(state).items():
        if value is not None:
            data[key] = value
    return "# sparkd's durable state. Written by sparkd; do not edit while it runs.\n" + (
        tomli_w.dumps(data)
    )


class StateStore:
    def __init__(self, state_dir: Path, *, now: dt.datetime | None = None) -> None:
        self.path = state_dir / STATE_FILE
        self._now = now

    def load(self) -> tuple[State, str | None]:
        """The stored state and, when the file was unusable, a message saying where it went.
        Temp files of writes that a crash or power cut stopped before their rename go."""
        for tmp in remove_stale_temps(self.path):
            log.info("removed %s, the temp file of a state write cut short", tmp)
        try:
            text = self.path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return State(), None
        except (OSError, UnicodeDecodeError) as exc:
            return State(), self._set_aside(f"unreadable: {exc}")
        if not text.strip():
            # sparkd never writes an empty file: a write cut short (a file system that lost
            # the data of a renamed file) or a hand edit. Not a silent fresh start.
            return State(), self._set_aside("empty")
        try:
            return parse_state(text), None
        except StateError as exc:
            return State(), self._set_aside(exc.message)

    def save(self, state: State) -> None:
        try:
            atomic_write(self.path, render_state(state).encode(), mode=0o644)
        except OSError as exc:
            raise StateError(f"cannot write {self.path}: {exc}") from exc

    def _set_aside(self, reason: str) -> str:
        now = self._now or dt.datetime.now(dt.UTC)
        aside = self.path.with_name(f"{self.path.name}.corrupt-{now:%Y%m%dT%H%M%SZ}")
        n = 1
        while aside.exists():
            aside = aside.with_name(f"{self.path.name}.corrupt-{now:%Y%m%dT%H%M%SZ}.{n}")
            n += 1
        self.path.rename(aside)
        message = f"state file {self.path} was unusable ({reason}); kept it as {aside}"
        log.error("%s", message)
        return message
