"""After an unclean boot, partial downloads are resumed in the background (issue 12), against
the local hub on loopback (tests/integration/hubserver.py) with the store's real download code:
only the bytes not on disk are fetched, every file ends correct, each step is a journal event
with its duration, and an unreachable source is one clear event and no retries."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest
from hubserver import FakeHub, run_hub
from test_store_pull import FAST, FILES, REPO, SHARD1, assert_all_correct, write_config

from sparkd.config import Config, ModelConfig, load_config
from sparkd.daemon.resume import (
    Resumer,
    can_connect,
    endpoint_address,
    models_with_partials,
)
from sparkd.journal import FIELDS_ATTR
from sparkd.store import hub as store_hub
from sparkd.store.model import pull_model
from sparkd.store.plan import VerifyReport
from sparkd.store.preflight import preflight_verify_async
from sparkd.store.verify import partial_path


@pytest.fixture(scope="module")
def hub_server() -> Iterator[FakeHub]:
    yield from run_hub()


@pytest.fixture
def hub(hub_server: FakeHub, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    hub_server.repos.clear()
    hub_server.faults.clear()
    hub_server.reset_log()
    hub_server.add_repo(REPO, FILES)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    yield hub_server


def cut_by_a_power_cut(config: Config, name: str, keep: int) -> None:
    """What a power cut in the middle of a pull leaves: `keep` bytes in the partial file."""
    dest = config.model("tiny").path / name
    partial_path(dest).write_bytes(FILES[name][:keep])
    dest.unlink()


def events(caplog: pytest.LogCaptureFixture) -> list[dict[str, str]]:
    return [getattr(r, FIELDS_ATTR) for r in caplog.records if hasattr(r, FIELDS_ATTR)]


async def find(config: Config, skip: Iterable[str]) -> list[str]:
    return await asyncio.to_thread(models_with_partials, config, skip)


def resume(config: Config, *, verify: object = preflight_verify_async) -> list[object]:
    host, port = endpoint_address(store_hub.endpoint())

    async def go() -> list[object]:
        return list(await Resumer().run(
            config, skip=(), verify=verify,  # type: ignore[arg-type]
            find=find, connect=lambda: can_connect(host, port, 2.0),
            sleep=asyncio.sleep, clock=time.monotonic, backoff_s=(0.01,)))
    return asyncio.run(go())


def test_a_partial_download_is_resumed_from_its_bytes_and_each_step_logged(
        hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(write_config(tmp_path))
    pull_model(config, config.model("tiny"), settings=FAST)
    half = len(FILES[SHARD1]) // 2
    cut_by_a_power_cut(config, SHARD1, half)
    hub.reset_log()
    caplog.set_level(logging.INFO)
    [result] = resume(config)
    assert result.ok and result.attempts == 1, result  # type: ignore[attr-defined]
    assert_all_correct(config)
    # Only the missing bytes came again: one transfer of SHARD1, from where it was cut.
    sent = [(e.file, e.range_start) for e in hub.body_requests()]
    assert sent == [(SHARD1, half)], sent
    got = {e["SPARKD_EVENT"]: e for e in events(caplog)}
    assert "boot_resume_found" in got and "boot_resume_done" in got, got
    assert got["boot_resume_done"]["SPARKD_MODEL"] == "tiny"
    assert int(got["boot_resume_done"]["SPARKD_DURATION_MS"]) >= 0


def test_nothing_to_resume_fetches_nothing_and_logs_nothing(
        hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    config = load_config(write_config(tmp_path))
    pull_model(config, config.model("tiny"), settings=FAST)
    hub.reset_log()
    caplog.set_level(logging.INFO)
    assert resume(config) == []
    assert hub.body_requests() == []
    assert not [e for e in events(caplog) if e["SPARKD_EVENT"].startswith("boot_resume")]


def test_an_unreachable_source_is_one_event_and_no_retry(
        hub: FakeHub, tmp_path: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    config = load_config(write_config(tmp_path))
    pull_model(config, config.model("tiny"), settings=FAST)
    cut_by_a_power_cut(config, SHARD1, 1000)
    with socket.socket() as s:  # a port nothing listens on: the machine is offline
        s.bind(("127.0.0.1", 0))
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{s.getsockname()[1]}")
    calls: list[str] = []

    async def verify(config: Config, model: ModelConfig) -> VerifyReport:
        calls.append(model.name)
        return await preflight_verify_async(config, model)

    caplog.set_level(logging.INFO)
    start = time.monotonic()
    [result] = resume(config, verify=verify)
    assert time.monotonic() - start < 3.0
    assert not result.ok and "offline" in result.detail, result  # type: ignore[attr-defined]
    assert calls == [], "a download was tried although the source is unreachable"
    names = [e["SPARKD_EVENT"] for e in events(caplog)]
    assert names.count("boot_resume_offline") == 1, names
    assert "boot_resume_failed" not in names
    # The partial stays for the next pull.
    assert partial_path(config.model("tiny").path / SHARD1).stat().st_size == 1000
