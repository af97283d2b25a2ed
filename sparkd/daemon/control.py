"""The control socket's requests, answered by the Supervisor (the whole API, as tuned's
controller is): each method, its parameters checked, and its reply in the schema's shape."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

from sparkd.control.protocol import Request
from sparkd.control.status import SwapReply
from sparkd.daemon.report import swap_record
from sparkd.errors import BadRequest

if TYPE_CHECKING:
    from sparkd.daemon.supervisor import Supervisor

# A swap's reason is in every status and event: short, printable, plain Unicode text.
REASON_RE = re.compile(r"[^\x00-\x1f\x7f\ud800-\udfff]{1,200}")
METHODS = ("status", "ping", "reload", "subscribe", "swap", "plan_swap", "unload")


async def answer(sup: Supervisor, request: Request) -> Any:
    if request.method == "status":
        return sup.status().to_json()
    if request.method == "ping":
        return {"pong": True}
    if request.method == "reload":
        return await sup.reload()
    if request.method in ("swap", "plan_swap", "unload"):
        model = request.params.get("model")
        if not isinstance(model, str):
            raise BadRequest(f'{request.method} needs "model": a model name')
        if request.method == "plan_swap":
            return {"plan": sup.plan(model).describe()}
        if request.method == "unload":
            return await sup.unload(model)
        reason = request.params.get("reason", "requested")
        if not isinstance(reason, str) or not REASON_RE.fullmatch(reason):
            raise BadRequest('"reason" must be printable text of at most 200 characters')
        run = sup.request_swap(model, reason=reason)
        return SwapReply(accepted=True, noop=run is None,
                         swap=None if run is None else swap_record(run)).to_json()
    raise BadRequest(f"unknown method {request.method!r} (known: {', '.join(METHODS)})")
