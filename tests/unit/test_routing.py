"""Routing decisions over the daemon's status: serve, hold, swap on demand, refuse; tolerant
reading of the checked status (a status that does not fit is refused); idle unloads;
/v1/models."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import status_builders as sb

from sparkd.config import parse_config
from sparkd.control.status import EngineRecord, Status, SwapRecord, VariantName
from sparkd.errors import SchemaError
from sparkd.gateway.routing import (
    DaemonView,
    Hold,
    Refuse,
    Serve,
    StartSwap,
    decide,
    idle_models,
    models_listing,
    serving_table,
    view_from_status,
)

CONFIG = parse_config("""
[models.a]
engine = "sim"
port = 9001
idle_unload_minutes = 10
[models.b]
engine = "sim"
port = 9002
[models.ext]
engine = "external"
url = "http://10.0.0.5:8000/"
""", source=Path("/etc/sparkd.toml"))
ON_DEMAND = parse_config("""
[gateway]
swap_on_demand = true
swap_min_interval_s = 60
[models.a]
engine = "sim"
port = 9001
""", source=Path("/etc/sparkd.toml"))


def engine(model: str, port: int, state: str = "active", *, ok: bool = True,
           variant: VariantName = "plain") -> EngineRecord:
    return sb.engine(model, port, active_state=state, healthy=ok, variant=variant)


def view(*engines: EngineRecord, swap: SwapRecord | None = None,
         active: str | None = None) -> DaemonView:
    return view_from_status(sb.status(engines=engines, swap=swap, active_model=active))


def d(model: str, v: DaemonView, config: Any = CONFIG, **kw: Any) -> Any:
    kw.setdefault("last_swap_request", None)
    return decide(config.models[model], v, config.gateway, now=1000.0, **kw)


def test_reads_variants_and_the_swap_from_the_status() -> None:
    v = view(engine("a", 9001), engine("a", 9011, variant="speculative"))
    assert [e.variant for e in v.endpoints["a"]] == ["plain", "speculative"]
    assert v.swap is None
    v = view(swap=sb.swap("a", step="prestart", started_at=5))
    assert v.swap is not None and v.swap.to_model == "a" and v.swap.started_at == 5.0


def test_a_status_that_does_not_fit_the_schema_is_refused_with_its_path() -> None:
    good = sb.status(engines=[engine("a", 9001)]).to_json()
    for junk, where in (("junk", "status: expected an object"),
                        ({**good, "engines": [{"model": 3}]}, "status.engines[0].model"),
                        ({**good, "swap": {"to": 5}}, "status.swap"),
                        ({**good, "engines": [{**good["engines"][0], "port": True}]},
                         "status.engines[0].port: expected an integer, got true")):
        with pytest.raises(SchemaError, match=re.escape(where)):
            Status.from_json(junk)


def test_serve_healthy_variants_and_external() -> None:
    v = view(engine("a", 9001), engine("a", 9011, variant="speculative", ok=False))
    assert d("a", v) == Serve({"plain": "http://127.0.0.1:9001"})
    assert d("ext", DaemonView()) == Serve({"plain": "http://10.0.0.5:8000"})


def test_hold_cases() -> None:
    assert isinstance(d("a", DaemonView()), Hold)  # no snapshot yet
    assert "loading" in d("a", view(engine("a", 9001, "activating", ok=False))).reason
    assert "loading" in d("a", view(engine("a", 9001, ok=False))).reason  # active, not healthy
    swap = sb.swap("a", from_model="b", step="stopping")
    assert "swap to a" in d("a", view(engine("b", 9002), swap=swap)).reason
    assert isinstance(d("b", view(swap=swap)), Hold)  # any swap: wait for it to end


def test_refuse_cases() -> None:
    r = d("a", view(engine("b", 9002), active="b"))
    assert isinstance(r, Refuse) and r.code == "model_not_loaded" and "active: b" in r.message
    r = d("a", view(engine("a", 9001, "failed", ok=False)))
    assert isinstance(r, Refuse) and r.code == "engine_failed"


def test_swap_on_demand_and_its_minimum_interval() -> None:
    v = view(active=None)
    assert isinstance(d("a", v, ON_DEMAND), StartSwap)
    assert isinstance(d("a", v, ON_DEMAND, swap_requested=True), Hold)
    r = d("a", v, ON_DEMAND, last_swap_request=990.0)
    assert isinstance(r, Refuse) and r.code == "swap_throttled" and r.retry_after_s == 50.0
    assert isinstance(d("a", v, ON_DEMAND, last_swap_request=900.0), StartSwap)


def test_idle_models() -> None:
    v = view(engine("a", 9001), engine("b", 9002))
    assert idle_models(CONFIG, v, {"a": 500.0, "b": 0.0}, now=1000.0) == []
    assert idle_models(CONFIG, v, {"a": 400.0, "b": 0.0}, now=1000.0) == ["a"]
    assert idle_models(CONFIG, view(engine("a", 9001, ok=False)), {"a": 0.0}, now=1e6) == []


def test_models_listing_says_what_is_loaded() -> None:
    v = view(engine("a", 9001), engine("b", 9002, "activating", ok=False))
    data = {m["id"]: m["sparkd"] for m in models_listing(CONFIG, v, created=1)["data"]}
    assert data["a"]["state"] == "loaded" and data["a"]["variants"] == ["plain"]
    assert data["b"]["state"] == "loading" and not data["b"]["loaded"]
    assert data["ext"]["state"] == "external"


def test_serving_table_is_decide_for_the_models_that_serve() -> None:
    v = view(engine("a", 9001), engine("b", 9002, "activating", ok=False))
    table = serving_table(CONFIG, v)
    assert table == {"a": Serve({"plain": "http://127.0.0.1:9001"}),
                     "ext": Serve({"plain": "http://10.0.0.5:8000"})}
    for name in CONFIG.models:
        assert (name in table) == isinstance(d(name, v), Serve)
