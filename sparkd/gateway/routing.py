"""PURE: what the gateway knows of the daemon, and what to do with a request for a model.

The daemon's subscribe stream sends the full status on every change (sparkd.control.status,
docs/status.md); `view_from_status` reads the part that routing needs from the checked
`Status`. `decide` maps (model, view, now) to one of:

    Serve       healthy engine(s): their URLs by variant
    Hold        the model is loading, a swap runs, or sparkd has not been heard yet: wait
    StartSwap   swap_on_demand: ask the daemon to swap to this model, then wait
    Refuse      503 with a reason (not loaded, failed, swap throttled)

A request that holds re-decides on each change of the view until it is served or its hold
time is over (the adapter, sparkd.gateway.app, does the waiting).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final

from sparkd.config import Config, GatewayConfig, ModelConfig, Variant
from sparkd.control.status import Status
from sparkd.engine.unit import engine_url

LOADING_STATES: Final = frozenset({"activating", "reloading"})


@dataclass(frozen=True, slots=True)
class Endpoint:
    model: str
    variant: Variant
    url: str
    active_state: str
    healthy: bool


@dataclass(frozen=True, slots=True)
class SwapView:
    from_model: str | None
    to_model: str
    step: str
    started_at: float


@dataclass(frozen=True, slots=True)
class DaemonView:
    seen: bool = False  # a snapshot has arrived at least once
    connected: bool = False
    endpoints: Mapping[str, tuple[Endpoint, ...]] = field(default_factory=dict)
    swap: SwapView | None = None
    active_model: str | None = None


def view_from_status(status: Status, *, connected: bool = True) -> DaemonView:
    """What routing needs of the daemon's status (already checked against the schema)."""
    endpoints: dict[str, list[Endpoint]] = {}
    for e in status.engines:
        endpoints.setdefault(e.model, []).append(
            Endpoint(e.model, e.variant, engine_url(e.port), e.active_state, e.healthy))
    swap = None if status.swap is None else SwapView(
        from_model=status.swap.from_model, to_model=status.swap.to, step=status.swap.step,
        started_at=status.swap.started_at)
    return DaemonView(
        seen=True,
        connected=connected,
        endpoints={k: tuple(v) for k, v in endpoints.items()},
        swap=swap,
        active_model=status.active_model,
    )


@dataclass(frozen=True, slots=True)
class Serve:
    urls: Mapping[Variant, str]


@dataclass(frozen=True, slots=True)
class Hold:
    reason: str


@dataclass(frozen=True, slots=True)
class StartSwap:
    reason: str


@dataclass(frozen=True, slots=True)
class Refuse:
    code: str
    message: str
    retry_after_s: float | None = None


Decision = Serve | Hold | StartSwap | Refuse


def decide(
    model: ModelConfig,
    view: DaemonView,
    gateway: GatewayConfig,
    *,
    now: float,
    last_swap_request: float | None,
    swap_requested: bool = False,
) -> Decision:
    """What to do now with a request for `model`. `swap_requested`: this request already
    asked for a swap (it waits for it instead of asking again)."""
    if not model.supervised:
        assert model.url is not None
        return Serve({"plain": model.url.rstrip("/")})
    endpoints = view.endpoints.get(model.name, ())
    healthy = {e.variant: e.url for e in endpoints if e.healthy}
    if healthy:
        return Serve(healthy)
    if not view.seen:
        return Hold("waiting for sparkd's first status")
    if view.swap is not None:
        return Hold(f"a swap to {view.swap.to_model} is running ({view.swap.step or 'started'})")
    if any(e.active_state in LOADING_STATES or e.active_state == "active" for e in endpoints):
        return Hold(f"{model.name} is loading")
    if swap_requested:
        return Hold(f"waiting for the swap to {model.name} to start")
    active = view.active_model or "none"
    if gateway.swap_on_demand:
        if last_swap_request is not None:
            wait = last_swap_request + gateway.swap_min_interval_s - now
            if wait > 0:
                return Refuse(
                    "swap_throttled",
                    f"model {model.name!r} is not loaded (active: {active}) and the last"
                    f" on-demand swap was {now - last_swap_request:.0f} s ago (at most one every"
                    f" {gateway.swap_min_interval_s:g} s)",
                    retry_after_s=wait,
                )
        return StartSwap(f"on-demand swap to {model.name} (active: {active})")
    failed = [e for e in endpoints if e.active_state == "failed"]
    if failed:
        return Refuse("engine_failed", f"the engine of model {model.name!r} has failed; "
                      f"see: journalctl -u {model.unit_name}")
    return Refuse(
        "model_not_loaded",
        f"model {model.name!r} is not loaded (active: {active}); start it with"
        f" `sparkctl swap {model.name}`, or set gateway.swap_on_demand",
    )


def serving_table(config: Config, view: DaemonView) -> dict[str, Serve]:
    """The models that serve right now, and where: `decide`'s Serve for each, computed once
    per status change instead of once per request."""
    table = {}
    for name, m in config.models.items():
        decision = decide(m, view, config.gateway, now=0.0, last_swap_request=None)
        if isinstance(decision, Serve):
            table[name] = decision
    return table


def idle_models(
    config: Config, view: DaemonView, last_used: Mapping[str, float], *, now: float
) -> list[str]:
    """Models serving now whose idle_unload_minutes have passed since their last request
    (a model never used counts from when the gateway first saw it healthy: `last_used`)."""
    due = []
    for name, m in sorted(config.models.items()):
        if m.idle_unload_minutes is None or not m.supervised:
            continue
        if not any(e.healthy for e in view.endpoints.get(name, ())):
            continue
        used = last_used.get(name)
        if used is not None and now - used >= m.idle_unload_minutes * 60:
            due.append(name)
    return due


def models_listing(config: Config, view: DaemonView, *, created: int) -> dict[str, Any]:
    """GET /v1/models: every configured model, and whether (and where) it is loaded."""
    data = []
    for name, m in sorted(config.models.items()):
        if m.supervised:
            endpoints = view.endpoints.get(name, ())
            loaded = any(e.healthy for e in endpoints)
            state = "loaded" if loaded else (
                "loading" if any(e.active_state in LOADING_STATES | {"active"} for e in endpoints)
                else "not_loaded")
            variants = sorted(e.variant for e in endpoints if e.healthy)
        else:
            loaded, state, variants = True, "external", ["plain"]
        data.append({
            "id": name, "object": "model", "created": created, "owned_by": "sparkd",
            "sparkd": {"engine": m.engine, "loaded": loaded, "state": state,
                       "variants": variants, "role_policy": m.role_policy},
        })
    return {"object": "list", "data": data}
