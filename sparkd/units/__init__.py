"""Engine units: pure rendering (`render`) and their reconciliation into the unit directory."""

from __future__ import annotations

from sparkd.units.reconcile import ReconcilePlan, ReconcileResult, plan_reconcile, reconcile
from sparkd.units.render import (
    GENERATED_MARKER,
    engine_argv,
    is_generated,
    quote_command,
    render_unit,
    render_units,
)

__all__ = [
    "GENERATED_MARKER",
    "ReconcilePlan",
    "ReconcileResult",
    "engine_argv",
    "is_generated",
    "plan_reconcile",
    "quote_command",
    "reconcile",
    "render_unit",
    "render_units",
]
