"""PURE: the facts of an engine unit, each stated once.

Its name (`sparkd-engine@NAME.service`, `NAME:spec` for a speculative variant), where the engine
listens (loopback: the gateway is the one door), and its time limits: the unit's
`TimeoutStartSec=` and `TimeoutStopSec=`, and how long sparkd waits for its start and stop jobs
(the unit's limit and a margin, so systemd, not sparkd, decides when a start has failed).
"""

from __future__ import annotations

import math
from typing import Final, Literal

UNIT_PREFIX: Final = "sparkd-engine@"
UNIT_SUFFIX: Final = ".service"
#: fnmatch pattern of the unit files sparkd manages.
UNIT_GLOB: Final = f"{UNIT_PREFIX}*{UNIT_SUFFIX}"
SPEC_SUFFIX: Final = ":spec"  # ':' cannot appear in a model name: never a model's instance

ENGINE_HOST: Final = "127.0.0.1"

#: Seconds of TimeoutStartSec= on top of the model's load_timeout_s, for `sparkd prestart`
#: (sync, drop caches, wait for memory to settle). Grows with daemon.settle_timeout_s.
PRESTART_ALLOWANCE_S: Final = 60
TIMEOUT_STOP_S: Final = 60
# Touched by every engine unit's ExecStopPost (as root): when an engine last stopped or died.
# prestart waits for memory to settle only when that was lately. Under sparkd.service's
# RuntimeDirectory (kept across sparkd restarts; gone at boot, when no engine has run).
ENGINE_STOPPED_STAMP: Final = "/run/sparkd/engine-stopped"
#: What sparkd adds to a unit's own limit before it gives up waiting for a job.
JOB_WAIT_MARGIN_S: Final = 30.0
#: How long sparkd waits for a stop job: TimeoutStopSec= (then systemd kills) and a margin.
STOP_WAIT_S: Final = TIMEOUT_STOP_S + JOB_WAIT_MARGIN_S

Variant = Literal["plain", "speculative"]


def unit_name(model: str, variant: Variant = "plain") -> str:
    instance = model if variant == "plain" else f"{model}{SPEC_SUFFIX}"
    return f"{UNIT_PREFIX}{instance}{UNIT_SUFFIX}"


def instance_of(unit: str) -> str | None:
    """The instance of an engine unit (`NAME` or `NAME:spec`), None for any other unit."""
    if unit.startswith(UNIT_PREFIX) and unit.endswith(UNIT_SUFFIX):
        return unit[len(UNIT_PREFIX) : -len(UNIT_SUFFIX)]
    return None


def is_engine_unit(unit: str) -> bool:
    return instance_of(unit) is not None


def engine_url(port: int) -> str:
    """Where an engine on `port` answers (its OpenAI API, /health, /metrics)."""
    return f"http://{ENGINE_HOST}:{port}"


def health_url(port: int) -> str:
    return f"{engine_url(port)}/health"


def start_timeout_s(load_timeout_s: float, settle_timeout_s: float) -> int:
    """The unit's TimeoutStartSec=: prestart's allowance (sync, drop, settle) plus the load."""
    return math.ceil(load_timeout_s) + max(PRESTART_ALLOWANCE_S,
                                           math.ceil(settle_timeout_s) + 30)


def start_wait_s(load_timeout_s: float, settle_timeout_s: float) -> float:
    """How long sparkd waits for a start job: the unit's TimeoutStartSec= and a margin."""
    return start_timeout_s(load_timeout_s, settle_timeout_s) + JOB_WAIT_MARGIN_S
