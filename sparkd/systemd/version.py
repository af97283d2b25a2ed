"""The version of the systemd installed here, for rendering units it will accept."""

from __future__ import annotations

import re
import subprocess

FALLBACK_VERSION = 252


def installed_systemd_version() -> int:
    """The version of systemctl here (`systemctl --version`), or 252 when there is none."""
    try:
        out = subprocess.run(
            ["systemctl", "--version"], capture_output=True, text=True, timeout=5, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return FALLBACK_VERSION
    match = re.match(r"systemd (\d+)", out)
    return int(match.group(1)) if match else FALLBACK_VERSION
