"""sd_notify (READY=1, STATUS=, WATCHDOG=1, STOPPING=1) through sdnotify, for sparkd and the
gateway alike; a no-op outside systemd (no NOTIFY_SOCKET)."""

from __future__ import annotations


class SdNotifier:
    def __init__(self) -> None:
        import sdnotify

        self._n = sdnotify.SystemdNotifier()

    def notify(self, state: str) -> None:
        # sdnotify encodes as Latin-1 (non-Latin-1 text raises inside it and is dropped
        # silently); systemd wants UTF-8. Hand it text whose Latin-1 bytes are our UTF-8.
        self._n.notify(state.encode("utf-8").decode("latin-1"))
