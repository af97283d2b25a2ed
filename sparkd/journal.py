"""Logging to journald with structured fields, or to stderr on a terminal.

`event(log, "engine_started", "...", SPARKD_MODEL="qwen")` logs a readable message and, under
systemd, the fields too, so `journalctl SPARKD_EVENT=engine_started -o json` finds it.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Mapping
from typing import Any, Final

FIELDS_ATTR: Final = "sparkd_fields"

_PRIORITY = {
    logging.CRITICAL: 2,
    logging.ERROR: 3,
    logging.WARNING: 4,
    logging.INFO: 6,
    logging.DEBUG: 7,
}


def event(
    logger: logging.Logger,
    name: str,
    message: str,
    *args: object,
    level: int = logging.INFO,
    common: Mapping[str, object] | None = None,
    **fields: object,
) -> None:
    """Log `message % args` as event `name` with extra journald fields (SPARKD_*):
    `common` (fields shared by a series of events) and then `fields`."""
    merged = {**(common or {}), **fields}
    extra = {FIELDS_ATTR: {"SPARKD_EVENT": name, **{k: str(v) for k, v in merged.items()}}}
    logger.log(level, message, *args, extra=extra)


def stderr_is_journal() -> bool:
    """True when systemd connected our stderr to journald (`JOURNAL_STREAM` names it)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def record_fields(record: logging.LogRecord) -> Mapping[str, str]:
    fields = getattr(record, FIELDS_ATTR, None)
    return fields if isinstance(fields, dict) else {}


class JournalHandler(logging.Handler):
    """Sends each record to journald's native socket with its structured fields."""

    def __init__(self, identifier: str) -> None:
        super().__init__()
        from pystemd import journal  # only under systemd

        self._sendv: Any = journal.sendv
        self._identifier = identifier

    def emit(self, record: logging.LogRecord) -> None:
        try:
            # Lone surrogates (from a client's text) are not UTF-8: escaped, never lost.
            message = self.format(record).encode("utf-8", "backslashreplace").decode("utf-8")
            fields = {
                "MESSAGE": message,
                "PRIORITY": str(_PRIORITY.get(record.levelno, 6)),
                "SYSLOG_IDENTIFIER": self._identifier,
                "CODE_FILE": record.pathname,
                "CODE_LINE": str(record.lineno),
                "CODE_FUNC": record.funcName,
                "LOGGER": record.name,
                **record_fields(record),
            }
            self._sendv(**fields)
        except Exception:
            self.handleError(record)


class FieldsFormatter(logging.Formatter):
    """On a terminal: the message, then the event fields in brackets."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = record_fields(record)
        if fields:
            text += " [" + " ".join(f"{k}={v}" for k, v in fields.items()) + "]"
        return text


def setup_logging(identifier: str, *, debug: bool = False) -> None:
    root = logging.getLogger()
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if stderr_is_journal():
        handler = JournalHandler(identifier)
        handler.setFormatter(logging.Formatter("%(message)s"))
    else:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(FieldsFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
