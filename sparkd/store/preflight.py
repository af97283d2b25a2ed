"""The swap preflight: a model's files are verified (incrementally) before its engine starts.

`preflight_verify(config, model)` is what the swap executor and `sparkd prestart` call. It
hashes only the files whose stamp changed since they last verified (usually none: a stat per
file), then:

- every file OK: returns the report (EXTRA files are reported but do not stop the start:
  sparkd never deletes files it did not put there);
- a BAD or MISSING file: raises `VerificationFailed` naming the files and why, unless the
  model says `repair = true`, in which case those files (only those) are fetched again first,
  and the start goes ahead only when they then verify.

A model with no manifest (never pulled, or no source: e.g. the simulated engine's, or weights
put there by hand) has nothing to verify against: the report has no files, its `note` says why
("run sparkctl pull NAME"), and the start goes ahead as it did before sparkd had a store.

Blocking (hashing, and the network when repairing): the daemon runs it in an executor.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from sparkd.config import Config, ModelConfig
from sparkd.errors import SparkdError, VerificationFailed
from sparkd.monitor.memory import format_size
from sparkd.store.model import (
    StoreSettings,
    current_manifest,
    has_manifest,
    repair_model,
    verify_model,
)
from sparkd.store.plan import Status, VerifyReport
from sparkd.store.progress import NullReporter, Reporter


def preflight_verify(
    config: Config, model: ModelConfig, *, reporter: Reporter | None = None
) -> VerifyReport:
    """Blocking: for `sparkd prestart` (a process of its own)."""
    manifest, note = current_manifest(config, model)
    if manifest is None:
        return VerifyReport(model=model.name, verdicts=(), manifest=None, note=note)
    return _refuse_blocking(model, verify_model(config, model, repair=model.repair,
                                                reporter=reporter))


async def preflight_verify_async(config: Config, model: ModelConfig) -> VerifyReport:
    """The daemon's preflight: stats and hashing in a worker thread, a repair's downloads on
    the daemon's own loop, so that a stopping sparkd cancels them instead of waiting for a
    thread it cannot stop."""
    manifest, note = await asyncio.to_thread(current_manifest, config, model)
    if manifest is None:
        return VerifyReport(model=model.name, verdicts=(), manifest=None, note=note)
    report = await asyncio.to_thread(verify_model, config, model)
    if report.blocking and model.repair:
        report = await repair_model(config, model, report, reporter=NullReporter(),
                                    settings=StoreSettings.from_config(config))
    return _refuse_blocking(model, report)


def _refuse_blocking(model: ModelConfig, report: VerifyReport) -> VerifyReport:
    if report.blocking:
        listed = "; ".join(f"{v.path}: {v.status.value} ({v.reason})" for v in report.blocking)
        hint = (
            "repair failed"
            if model.repair
            else f"run `sparkctl verify {model.name} --repair`, or set repair = true"
        )
        raise VerificationFailed(
            f"model {model.name}: {len(report.blocking)} file(s) failed verification: "
            f"{listed} ({hint})"
        )
    return report


def prestart_verify(config: Config, name: str, emit: Callable[[str], None]) -> bool:
    """`sparkd prestart`'s step for a model that has a manifest (nothing for one without):
    one line to `emit` (the journal), and False when the start must be refused."""
    prefix = f"prestart {name}"
    model = config.model(name)
    if not has_manifest(config, model):
        return True
    start = time.monotonic()
    try:
        report = preflight_verify(config, model)
    except SparkdError as exc:
        emit(f"{prefix}: refused: {exc.message}")
        return False
    took = (time.monotonic() - start) * 1000
    hashed = sum(1 for v in report.verdicts if v.hashed)
    extra = [v.path for v in report.verdicts if v.status is Status.EXTRA]
    line = (
        f"{prefix}: verify: {len(report.verdicts) - len(extra)} files OK ({hashed} hashed, "
        f"{format_size(report.hashed_bytes)}, {format_size(report.fetched_bytes)} fetched) "
        f"in {took:.0f} ms"
    )
    if extra:
        line += f"; {len(extra)} not in the manifest: {', '.join(extra[:5])}"
    emit(line)
    return True
