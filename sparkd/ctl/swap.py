"""`sparkctl swap NAME`: swap the serving model, showing each step as sparkd runs it; and
`sparkctl recover`: the same swap, to the model sparkd wants serving (its desired model).

One swap at a time: a second `sparkctl swap` while one runs is refused with the swap in
progress (exit 8) rather than queued, so two operators never stack surprises on each other.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from sparkd.ctl.complete import complete_model
from sparkd.ctl.exits import run
from sparkd.errors import DaemonUnreachable, SparkdError, SwapFailed, SwapRefused, WaitTimeout
from sparkd.options import config_option, json_option

if TYPE_CHECKING:
    from sparkd.control.status import Event


class Seconds(click.ParamType):  # type: ignore[type-arg]  # generic from click 8.2 on
    """Seconds to wait: positive and finite (0 would make the socket non-blocking)."""

    name = "seconds"

    def convert(self, value: object, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            self.fail(f"{value!r} is not a number of seconds", param, ctx)
        if not (math.isfinite(seconds) and 0 < seconds <= 1e6):
            self.fail(f"{value!r}: expected seconds above 0, at most 1000000", param, ctx)
        return seconds


TIMEOUT = Seconds()


@click.command()
@click.argument("name", shell_complete=complete_model)
@config_option
@click.option("--dry-run", is_flag=True, help="Print the plan; change nothing.")
@click.option("--no-wait", is_flag=True, help="Return once sparkd has accepted the swap.")
@click.option("--timeout", "timeout_s", type=TIMEOUT, default=None,
              help="Stop waiting after this many seconds (the swap goes on in sparkd).")
@json_option
@click.pass_context
def swap(
    ctx: click.Context,
    name: str,
    config_file: Path,
    *,
    dry_run: bool,
    no_wait: bool,
    timeout_s: float | None,
    as_json: bool,
) -> None:
    """Swap the serving model to NAME: stop the active engine, drop the page cache, start
    NAME, gate on its health, and roll back to the last good model if any step fails.

    Exit 0 when NAME serves, 7 when the swap failed (rolled back), 8 when another swap is in
    progress, 9 when preflight refused it (nothing changed), 6 for an unknown model.
    """

    def go() -> None:
        from sparkd.control.client import call, socket_path

        sock = socket_path(config_file)
        if dry_run:
            plan = call(sock, "plan_swap", {"model": name})["plan"]
            click.echo(json.dumps({"plan": plan}) if as_json else "\n".join(plan))
            return
        swap_and_follow(sock, name, no_wait=no_wait, timeout_s=timeout_s, as_json=as_json)

    run(ctx, go)


@click.command()
@config_option
@click.option("--timeout", "timeout_s", type=TIMEOUT, default=None,
              help="Stop waiting after this many seconds (the swap goes on in sparkd).")
@json_option
@click.pass_context
def recover(ctx: click.Context, config_file: Path, *, timeout_s: float | None,
            as_json: bool) -> None:
    """Bring the desired model back to serving, as sparkd does at boot: nothing when its
    unit is active; otherwise a swap to it (a failed unit is reset first), rolled back to the
    last good model if it does not come up.

    For an engine stopped by hand, or a failed one after its cause was fixed. To go back to
    the last good model instead, `sparkctl swap LAST_GOOD`. Exit codes as for `sparkctl swap`
    (3 also when sparkd goes away mid-swap); 1 when there is no desired model.
    """

    def go() -> None:
        from sparkd.control import client

        sock = client.socket_path(config_file)
        status = client.status(sock)
        desired = status.desired_model
        failure = status.last_failure
        if desired is None and failure is not None:
            # A failed swap (the default model's start at a first boot, say) rolled back to
            # nothing: no last good model. daemon.default_model may well be set.
            raise NothingToRecover(
                f"sparkd has no desired model: the last swap, to {failure.model}, failed "
                f"({failure.reason}) with no last good model to roll back to; see sparkctl "
                f"logs --model {failure.model}, fix the cause, then: sparkctl swap "
                f"{failure.model}")
        if desired is None:
            raise NothingToRecover("sparkd has no desired model (no daemon.default_model, "
                                   "nothing swapped to, or it was unloaded): sparkctl swap NAME")
        if not as_json:
            click.echo(f"desired model: {desired}" + (
                f" (last failure, of {failure.model}: {failure.reason})"
                if failure is not None else ""))
        swap_and_follow(sock, desired, no_wait=False, timeout_s=timeout_s, as_json=as_json)

    run(ctx, go)


class NothingToRecover(SparkdError):
    code = "no_desired_model"


def swap_and_follow(sock: Path, name: str, *, no_wait: bool, timeout_s: float | None,
                    as_json: bool) -> None:
    """Ask sparkd for a swap to `name` and print its steps until it ends. Raises SwapFailed,
    SwapRefused, SwapInProgress, WaitTimeout."""
    from sparkd.control.client import call, stream
    from sparkd.control.status import Event, SwapReply

    # Subscribe before asking, so that no step of this swap can be missed.
    events = (Event.from_json(m) for m in stream(sock, "subscribe", timeout_s=timeout_s))
    if next(events, None) is None:  # the snapshot: the subscription is in place
        raise DaemonUnreachable(f"sparkd closed {sock} without sending its status")
    reply = SwapReply.from_json(call(sock, "swap", {"model": name}))
    if reply.swap is None:
        _say({"event": "noop", "model": name}, f"{name} is already serving", as_json=as_json)
        return
    swap_id = reply.swap.id
    _say({"event": "accepted", "swap": reply.swap.to_json()},
         f"swap {swap_id}: {reply.swap.from_model or 'nothing'} -> {name} accepted",
         as_json=as_json)
    if no_wait:
        return
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    try:
        for message in events:
            if deadline is not None and time.monotonic() > deadline:
                break
            if _show(message, swap_id, as_json=as_json):
                return
        else:
            # The stream ended before the swap did: sparkd stopped or restarted (a restarted
            # sparkd resumes the swap) or dropped this subscriber for falling behind.
            raise DaemonUnreachable(
                f"sparkd closed the event stream before swap {swap_id} ended; a swap in "
                "flight is resumed when sparkd starts again: sparkctl status shows it")
    except TimeoutError:
        pass
    raise WaitTimeout(f"stopped waiting after {timeout_s:g} s; the swap goes on in sparkd "
                      "(sparkctl status shows it)")


def _say(obj: dict[str, Any], text: str, *, as_json: bool) -> None:
    click.echo(json.dumps(obj, sort_keys=True) if as_json else text)


def _show(message: Event, swap_id: int, *, as_json: bool) -> bool:
    """Print one event of this swap; True when the swap has ended (raises when it failed)."""
    swap = message.swap
    if swap is None or swap.id != swap_id:
        return False
    if message.event == "swap_step" and swap.steps:
        step = swap.steps[-1]
        mark = click.style("ok", fg="green") if step.ok else click.style("FAILED", fg="red")
        _say({"event": "step", **step.to_json()},
             f"  {step.step:<12} {mark:<6} {step.duration_ms:8.0f} ms  {step.detail}",
             as_json=as_json)
    elif message.event == "swap_done":
        _say({"event": "done", "swap": swap.to_json()},
             click.style(f"{swap.to} serves", bold=True)
             + f" (swap took {swap.duration_ms:.0f} ms)", as_json=as_json)
        return True
    elif message.event == "swap_failed":
        if as_json:
            _say({"event": "failed", "swap": swap.to_json()}, "", as_json=True)
        if swap.step == "refused":
            raise SwapRefused(f"swap to {swap.to} refused at {swap.failure}; "
                              "nothing was changed")
        if swap.step != "rolled_back":
            outcome = "the rollback failed too"
        elif swap.rollback_to:
            outcome = f"rolled back to {swap.rollback_to}"
        else:
            outcome = "stopped it, nothing to roll back to"
        raise SwapFailed(f"swap to {swap.to} failed at {swap.failure}; {outcome}")
    return False
