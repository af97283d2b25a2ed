"""PURE: the `[daemon]` keys of the udev watch (docs/watch.md, "udev"), checked with the same
file/key/fix errors as every other key; kept out of sparkd/config.py for its size."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from sparkd.config_checks import Validator
from sparkd.monitor.devices import ON_BATTERY

#: At most a day on battery before stopping: longer is no UPS anyone has.
GRACE_MAX_S: Final = 86400.0


def device_keys(v: Validator, t: Mapping[str, Any], d: Any) -> dict[str, Any]:
    """`daemon.on_battery` and `daemon.on_battery_grace_s`, over the defaults of `d` (a
    DaemonConfig), as keyword arguments for DaemonConfig."""
    return {
        "on_battery": v.choice(t, "daemon.on_battery", ON_BATTERY, d.on_battery),
        "on_battery_grace_s": v.number(t, "daemon.on_battery_grace_s", d.on_battery_grace_s,
                                       lo=0, hi=GRACE_MAX_S),
    }
