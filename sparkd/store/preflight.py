"""The swap preflight: a model's files are verified (incrementally) before its engine starts.

`preflight_verify(config, model)` is what the swap executor and `sparkd prestart` call. It
hashes only the files whose stamp changed since they last verified (usually none: a stat per
file), then:

- every file OK: returns the report (EXTRA files are reported but do not stop the start:
  sparkd never deletes files it did not put there);
- a BAD or MISSING file: raises `VerificationFailed` naming the files and why, unless the
  model says `repair = true`, in which case those files (only those) are fetched again first,
  and the start goes ahead only when they then verify.

A model with no manifest and no source (e.g. the simulated engine's) has nothing to verify:
the report says so and the start goes ahead. A model with a source that was never pulled
raises `ManifestError` ("run sparkctl pull NAME").

Blocking (hashing, and the network when repairing): the daemon runs it in an executor.
"""

from __future__ import annotations

from sparkd.config import Config, ModelConfig
from sparkd.errors import ManifestError, VerificationFailed
from sparkd.store.model import current_manifest, verify_model
from sparkd.store.plan import VerifyReport
from sparkd.store.progress import Reporter


def preflight_verify(
    config: Config, model: ModelConfig, *, reporter: Reporter | None = None
) -> VerifyReport:
    manifest, note = current_manifest(config, model)
    if manifest is None:
        if model.source is not None:
            raise ManifestError(note)
        return VerifyReport(model=model.name, verdicts=(), manifest=None, note=note)
    report = verify_model(config, model, repair=model.repair, reporter=reporter)
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
