"""PURE: the one definition of what the daemon says on its control socket.

The status document (`sparkctl status --json`, the `status` request), the messages of the
`subscribe` stream and the swap record inside them are frozen dataclasses here. The daemon builds
them (`sparkd.daemon`); the gateway, sparkctl and doctor read what arrives through
`Status.from_json` / `Event.from_json`, which check every field and name the first one that does
not fit (`SchemaError`), so a reader never subscripts a shape the daemon does not send.
docs/status.md shows the JSON; within `SCHEMA` fields are only added, never renamed.

Events on the stream::

    snapshot     first message of every subscription: the status
    changed      something a router cares about changed (units, health, desired model)
    swap_step    a swap reached a step: `swap` is its record, steps so far included
    swap_done    the swap ended with the target serving
    swap_failed  the swap ended otherwise: refused (nothing changed), rolled back, or worse;
                 `swap.failure` says why, `swap.step` how it ended
    keepalive    nothing happened for a while (no status)
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from sparkd.control.codec import from_json, to_json

SCHEMA: Final = 1

EventName = Literal["snapshot", "changed", "swap_step", "swap_done", "swap_failed",
                    "keepalive"]
SWAP_EVENTS: Final = frozenset({"swap_step", "swap_done", "swap_failed"})
DaemonStateName = Literal["starting", "running", "stopping"]
VariantName = Literal["plain", "speculative"]
DesktopStateName = Literal["present", "headless", "unknown"]


class _Json:
    """to_json / from_json for the records below."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = to_json(self)
        return out

    @classmethod
    def from_json(cls, data: object, path: str = "$") -> Any:
        return from_json(cls, data, path)


@dataclass(frozen=True, slots=True)
class StepRecord(_Json):
    """One finished step of a swap."""

    step: str
    ok: bool
    duration_ms: float
    detail: str


@dataclass(frozen=True, slots=True)
class SwapRecord(_Json):
    """A swap, in progress (`status.swap`) or finished (`status.last_swap`, swap_* events)."""

    id: int
    from_model: str | None = field(metadata={"json": "from"})
    to: str
    reason: str
    step: str  # a SwapStep value: sparkd.engine.plan
    started_at: float  # Unix time
    duration_ms: float
    rollback_to: str | None
    failure: str | None  # why it failed: the step and its reason
    steps: tuple[StepRecord, ...] = ()

    @property
    def ended(self) -> bool:
        return self.step in ("done", "refused", "rolled_back", "rollback_failed")


@dataclass(frozen=True, slots=True)
class HealthRecord(_Json):
    ok: bool
    status: int | None  # the HTTP status of /health, None when no answer
    error: str | None
    latency_ms: float


@dataclass(frozen=True, slots=True)
class FingerprintRecord(_Json):
    """A known engine log line seen at start (sparkd.engine.fingerprints)."""

    id: str
    severity: str
    meaning: str
    value: str | None
    line: str


@dataclass(frozen=True, slots=True)
class EngineRecord(_Json):
    """One engine unit (a model's plain or speculative variant) as systemd and probes see it.
    `active_state` .. `n_restarts` are systemd's ActiveState, SubState, MainPID, NRestarts."""

    model: str
    engine: str
    variant: VariantName
    unit: str
    port: int
    load_state: str
    active_state: str
    sub_state: str
    main_pid: int
    n_restarts: int
    result: str
    health: HealthRecord | None = None
    health_failures: int = 0
    fingerprints: tuple[FingerprintRecord, ...] = ()
    note: str | None = None  # why a speculative variant is not running, say
    # The engine release the unit was rendered for (models.NAME.engine_version, else the one
    # found installed), and, outside sparkd's table (sparkd/engine/versions.py), which rules
    # were used instead.
    engine_version: str | None = None
    engine_version_warning: str | None = None
    # The MoE backend the engine's log says it chose (--moe-backend words; None: it said
    # nothing).
    moe_backend: str | None = None

    @property
    def healthy(self) -> bool:
        return self.health is not None and self.health.ok and self.active_state == "active"


@dataclass(frozen=True, slots=True)
class ReloadRecord(_Json):
    ok: bool
    message: str
    at: float  # Unix time


@dataclass(frozen=True, slots=True)
class DaemonRecord(_Json):
    state: DaemonStateName
    status_line: str  # the STATUS= line systemd shows
    pid: int
    version: str
    uptime_s: float
    started_at: float  # Unix time
    config: str
    systemd_version: int
    state_warning: str | None = None  # set when a corrupt state file was kept aside
    last_reload: ReloadRecord | None = None
    # The administrator's file refused at start: sparkd runs on the last accepted config.
    config_refused: str | None = None
    # A durable write that failed (until one succeeds): the state, the accepted config.
    state_unsaved: str | None = None
    config_unsaved: str | None = None
    # The udev watch (docs/watch.md): the NVIDIA device gone (engines held stopped), why swaps
    # are refused now (a model volume gone, the GPU gone, engines stopped on battery), and why
    # the machine is on battery.
    degraded: str | None = None
    swaps_paused: str | None = None
    on_battery: str | None = None


@dataclass(frozen=True, slots=True)
class FailureRecord(_Json):
    model: str
    reason: str | None


@dataclass(frozen=True, slots=True)
class MemoryRecord(_Json):
    """/proc/meminfo's figures, or `error` when it could not be read."""

    total_bytes: int | None = None
    available_bytes: int | None = None
    page_cache_bytes: int | None = None
    accounting: str | None = None  # where the figures come from (unified or discrete GPU)
    error: str | None = None


@dataclass(frozen=True, slots=True)
class PressureRecord(_Json):
    """PSI of one resource, percent of time stalled (`full` absent for cpu before 5.13)."""

    some_avg10: float
    some_avg60: float
    full_avg10: float | None = None
    full_avg60: float | None = None


@dataclass(frozen=True, slots=True)
class GpuProcessRecord(_Json):
    pid: int
    used_bytes: int | None


@dataclass(frozen=True, slots=True)
class GpuRecord(_Json):
    index: int
    name: str
    uuid: str
    memory_total_bytes: int | None  # None: not supported (unified memory, GB10)
    memory_used_bytes: int | None
    utilization_pct: int | None
    temperature_c: int | None
    power_w: float | None
    processes: tuple[GpuProcessRecord, ...]
    process_bytes: int
    unsupported: tuple[str, ...]
    # NVML utilization.memory: the share of time device memory was read or written.
    memory_utilization_pct: int | None = None


@dataclass(frozen=True, slots=True)
class GpusRecord(_Json):
    driver: str | None
    error: str | None
    unified_memory: bool
    gpus: tuple[GpuRecord, ...]


@dataclass(frozen=True, slots=True)
class WatchActionRecord(_Json):
    """Something the watch did (sparkd.daemon.actions). `kind`: memory_floor_stop (an
    engine stopped at the memory floor, journal event memory_floor), liveness_restart (no
    token while requests ran, engine_hung with SPARKD_REASON=liveness), hung_restart (/health
    failing, engine_hung), power_stop and gpu_stop (the udev watch stopped it: on battery, the
    NVIDIA device gone; engines_held), desktop_latency_moe and desktop_stop (the desktop
    ladder restarted it with the latency MoE backend, stopped it); other watches add their
    own. `detail`: its numbers in words."""

    kind: str
    model: str
    at: float  # Unix time
    detail: str


@dataclass(frozen=True, slots=True)
class MachineRecord(_Json):
    """What the watch sees of the machine beyond `memory`, `pressure` and `gpu`
    (docs/watch.md "Shown and exported"). Every field is optional: None is "not read",
    never zero."""

    # The memory floor (daemon.memory_floor_gib; None: off) and each running engine's memory
    # (its cgroup's memory.current), by engine: the unit's instance name (the model's name,
    # or its speculative variant's).
    floor_bytes: int | None = None
    engine_memory_bytes: Mapping[str, int] = field(default_factory=dict)
    # The timer-lateness probe's p99 over its window, ms (None: no fresh report).
    lateness_p99_ms: float | None = None
    desktop: DesktopStateName = "unknown"
    # The last watch actions, oldest first (a few), and how many of each kind since start.
    actions: tuple[WatchActionRecord, ...] = ()
    action_counts: Mapping[str, int] = field(default_factory=dict)
    # Swaps since start by how they ended (done, refused, rolled_back, rollback_failed).
    swaps: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Status(_Json):
    """The daemon's whole status: the `status` reply, and inside every stream message."""

    daemon: DaemonRecord
    desired_model: str | None
    active_model: str | None  # the model whose unit is active, or None
    last_good_model: str | None
    swap: SwapRecord | None = None  # the swap in progress
    last_swap: SwapRecord | None = None  # the last finished swap
    last_failure: FailureRecord | None = None
    engines: tuple[EngineRecord, ...] = ()
    memory: MemoryRecord = field(default_factory=MemoryRecord)
    pressure: Mapping[str, PressureRecord] = field(default_factory=dict)
    gpu: GpusRecord | None = None  # None before the first NVML read
    schema: int = SCHEMA
    machine: MachineRecord | None = None  # None: a daemon before issue 13's display

    @classmethod
    def from_json(cls, data: object, path: str = "status") -> Status:
        status: Status = from_json(cls, data, path)
        return status

    def engine(self, unit: str) -> EngineRecord | None:
        return next((e for e in self.engines if e.unit == unit), None)


@dataclass(frozen=True, slots=True)
class Event(_Json):
    """One message of the subscribe stream (the module's docstring lists the events)."""

    event: EventName
    status: Status | None = None
    swap: SwapRecord | None = None

    def __post_init__(self) -> None:
        if self.event != "keepalive" and self.status is None:
            raise ValueError(f"a {self.event!r} event carries the status")
        if (self.event in SWAP_EVENTS) != (self.swap is not None):
            raise ValueError(f"a {self.event!r} event carries a swap record"
                             if self.swap is None else
                             f"a {self.event!r} event carries no swap record")

    @classmethod
    def from_json(cls, data: object, path: str = "event") -> Event:
        ev: Event = from_json(cls, data, path)
        return ev


@dataclass(frozen=True, slots=True)
class SwapReply(_Json):
    """The reply to a `swap` request: accepted, and either a no-op (the model already
    serves) or the swap now running."""

    accepted: bool
    noop: bool
    swap: SwapRecord | None

    @classmethod
    def from_json(cls, data: object, path: str = "reply") -> SwapReply:
        reply: SwapReply = from_json(cls, data, path)
        return reply
