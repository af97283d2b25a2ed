"""The gateway against what the real daemon says: the Supervisor (over fake systemd) behind a
real control socket, its swap failing as a crashing engine's would. A request held for the
model gets the daemon's reason as 503 swap_failed as soon as the swap has failed and rolled
back, not the advice to try the swap that just failed."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from conftest import SimEngine, SimEngines
from fakes import FakeSystemd, World, build, started
from gateway_harness import Gateway, Reply, get, post, running_gateway

from sparkd.systemd.manager import JobDone

GOOD, CRASH = "sim-good", "sim-crash"


class SlowCrash(FakeSystemd):
    """The crashing model's start job ends, failed, only when the test says so (a model
    that crashes during its load); every other job ends at once."""

    def __init__(self) -> None:
        super().__init__(fail_start={CRASH})
        self.held: list[JobDone] = []
        self._holding = False

    def start_unit(self, name: str) -> str:
        self._holding = CRASH in name
        try:
            return super().start_unit(name)
        finally:
            self._holding = False

    def _job(self, name: str, result: str) -> str:
        if not self._holding:
            return super()._job(name, result)
        job_id = next(self._jobs)
        self.held.append(JobDone(job_id, name, result))
        return f"/org/freedesktop/systemd1/job/{job_id}"

    async def crash(self) -> None:
        """The crashing model's load ends: its start job fails."""
        assert self.supervisor is not None
        for done in self.held:
            self.supervisor.on_systemd_event(done)
        self.held.clear()


@pytest.fixture(scope="module")
def engine(module_sim_engines: SimEngines) -> SimEngine:
    e = module_sim_engines.start("--load-seconds", "0", model=GOOD)
    e.wait_health(200)
    return e


def models(port: int) -> str:
    return f"""
[models.{GOOD}]
engine = "sim"
port = {port}
[models.{CRASH}]
engine = "sim"
port = {port + 1}
"""


def daemon(tmp_path: Path, port: int) -> tuple[World, SlowCrash]:
    text = f'[daemon]\ndefault_model = "{GOOD}"\nstate_dir = "{{state}}"\n' + models(port)
    systemd = SlowCrash()
    return build(tmp_path, text, systemd=systemd), systemd


def ask(gw: Gateway, model: str) -> tuple[threading.Thread, list[Reply]]:
    out: list[Reply] = []
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    t = threading.Thread(target=lambda: out.append(
        post(gw.url + "/v1/chat/completions", json_body=body)))
    t.start()
    return t, out


def wait_for(predicate: Any, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached")
        time.sleep(0.01)


def serving(gw: Gateway) -> list[str]:
    loaded: list[str] = get(gw.url + "/health").json()["loaded"]
    return loaded


def assert_swap_failed(reply: Reply, *, waited_s: float) -> None:
    assert reply.status_code == 503, reply.text
    error = reply.json()["error"]
    assert error["code"] == "swap_failed", error
    assert f"the swap to {CRASH} failed: start: sparkd-engine@{CRASH}.service start job " \
           "failed" in error["message"]
    assert f"rolled back to {GOOD}" in error["message"]
    assert "sparkctl swap" not in error["message"]
    assert waited_s < 30 / 2  # at once: long before the hold time is over


@pytest.mark.parametrize("who_swaps", ["sparkctl", "the gateway on demand"])
def test_requests_held_for_a_swap_that_fails_get_its_reason_at_once(
    tmp_path: Path, engine: SimEngine, who_swaps: str
) -> None:
    w, systemd = daemon(tmp_path, engine.port)
    gateway = "hold_seconds = 30\n" + (
        "swap_on_demand = true\n" if who_swaps != "sparkctl" else "")
    text = f'[gateway]\nlisten = "{{listen}}"\n{gateway}' + models(engine.port)
    with running_gateway(text, supervisor=w.sup) as gw:
        gw.run(lambda: started(w.sup))
        wait_for(lambda: serving(gw) == [GOOD])
        if who_swaps == "sparkctl":
            async def swap() -> None:
                w.sup.request_swap(CRASH)
            gw.run(swap)
            # The gateway has heard of the swap (as a client's request during one would).
            wait_for(lambda: (get(gw.url + "/health").json()["daemon"]["swap"] or {}).get(
                "to") == CRASH)
        t, out = ask(gw, CRASH)
        wait_for(lambda: get(gw.url + "/health").json()["held_requests"] == 1)
        wait_for(lambda: bool(systemd.held))  # the swap is at its start step
        crashed = time.monotonic()
        gw.run(systemd.crash)
        t.join(20)
        assert_swap_failed(out[0], waited_s=time.monotonic() - crashed)
        # The daemon rolled back and the gateway saw it: the good model serves again.
        wait_for(lambda: serving(gw) == [GOOD])
        assert w.sup.state.last_failure_model == CRASH
        gw.run(w.sup.quiesce)


def test_the_gateways_link_records_a_failed_swap_from_the_daemons_own_events(
    tmp_path: Path, engine: SimEngine
) -> None:
    """Every message the real Supervisor publishes through a failed swap parses against the
    schema, and the link remembers the failure for the target with the daemon's reason."""
    from sparkd.gateway import daemon_link
    from sparkd.gateway.state import GatewayState

    w, systemd = daemon(tmp_path, engine.port)
    config = w.sup.config

    async def scenario() -> GatewayState:
        await started(w.sup)
        stream = w.sup.subscribe()
        state = GatewayState()
        daemon_link.apply_event(state, config, await anext(stream), now=1.0)
        w.sup.request_swap(CRASH)
        while not systemd.held:
            await asyncio.sleep(0.01)
        await systemd.crash()
        while CRASH not in state.swap_failures:
            message = await asyncio.wait_for(anext(stream), 10)
            daemon_link.apply_event(state, config, message, now=2.0)
        await stream.aclose()
        await w.sup.quiesce()
        return state

    state = asyncio.run(scenario())
    when, why = state.swap_failures[CRASH]
    assert when == 2.0
    assert why.startswith(f"start: sparkd-engine@{CRASH}.service start job failed")
    assert why.endswith(f"rolled back to {GOOD}")
    assert state.view.active_model == GOOD
