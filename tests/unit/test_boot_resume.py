"""The background resume of partial downloads after an unclean boot: which models, how often,
and that a swap's preflight of the same model waits for it (sparkd/daemon/resume.py)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from pathlib import Path

from sparkd.config import Config, ModelConfig, parse_config
from sparkd.daemon.resume import Resumer, endpoint_address, models_with_partials
from sparkd.errors import VerificationFailed
from sparkd.store.plan import VerifyReport


def config(tmp_path: Path) -> Config:
    text = "[daemon]\n" + "".join(
        f'[models.{name}]\nengine = "vllm"\nport = {8300 + i}\npath = "{tmp_path / name}"\n'
        + (f'source = "hf://acme/{name}"\n' if name != "nosource" else "")
        for i, name in enumerate(("desired", "other", "nosource", "whole")))
    for name in ("desired", "other", "nosource", "whole"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "config.json").write_text("{}")
    for name in ("desired", "other", "nosource"):
        (tmp_path / name / ".model.safetensors.part").write_bytes(b"x" * 10)
    return parse_config(text, source=tmp_path / "sparkd.toml")


def test_only_models_with_a_source_and_partial_files_and_not_the_desired_one(
        tmp_path: Path) -> None:
    assert models_with_partials(config(tmp_path), skip={"desired"}) == ["other"]


def test_endpoint_address() -> None:
    assert endpoint_address(None) == ("huggingface.co", 443)
    assert endpoint_address("http://127.0.0.1:8765") == ("127.0.0.1", 8765)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, s: float) -> None:
        self.slept.append(s)
        self.now += s


def test_a_failing_resume_is_tried_three_times_then_given_up(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    clock = Clock()
    calls: list[tuple[str, bool]] = []

    async def verify(_config: Config, model: ModelConfig) -> VerifyReport:
        calls.append((model.name, model.repair))
        raise VerificationFailed(f"model {model.name}: 1 file(s) failed verification")

    async def find(c: Config, skip: Iterable[str]) -> list[str]:
        return models_with_partials(c, skip)

    async def online() -> str | None:
        return None

    [result] = asyncio.run(Resumer().run(cfg, skip={"desired"}, verify=verify, find=find,
                                         connect=online, sleep=clock.sleep, clock=clock))
    assert not result.ok and result.attempts == 3
    assert calls == [("other", True)] * 3  # with repair: fetched from its source
    assert clock.slept == [30.0, 120.0]  # bounded, and spaced out


def test_a_swap_preflight_of_the_model_waits_for_its_resume(tmp_path: Path) -> None:
    cfg = config(tmp_path)
    order: list[str] = []
    release = asyncio.Event()

    async def slow_verify(_config: Config, model: ModelConfig) -> VerifyReport:
        order.append(f"resume {model.name} begins")
        await release.wait()
        order.append(f"resume {model.name} ends")
        return VerifyReport(model=model.name, verdicts=(), manifest=None)

    async def swap_verify(_config: Config, model: ModelConfig) -> VerifyReport:
        order.append(f"preflight {model.name}")
        return VerifyReport(model=model.name, verdicts=(), manifest=None)

    async def find(c: Config, skip: Iterable[str]) -> list[str]:
        return models_with_partials(c, skip)

    async def online() -> str | None:
        return None

    async def go() -> None:
        resumer = Resumer()
        background = asyncio.create_task(resumer.run(
            cfg, skip={"desired"}, verify=slow_verify, find=find, connect=online,
            sleep=asyncio.sleep, clock=lambda: 0.0))
        while not order:
            await asyncio.sleep(0)
        preflight = asyncio.ensure_future(resumer.guard(swap_verify)(cfg, cfg.model("other")))
        await asyncio.sleep(0.05)
        assert order == ["resume other begins"]  # the preflight waits
        release.set()
        await asyncio.gather(background, preflight)

    asyncio.run(go())
    assert order == ["resume other begins", "resume other ends", "preflight other"]
