"""A configured model's files: verify them, pull them, repair them. The composition of the
store's parts for `sparkctl pull/verify`, `sparkd prestart` and the swap preflight.

Which manifest a model has:
- `source = "hf://ORG/REPO"`: the one `pull` wrote from the Hub's metadata
  (STATE_DIR/manifests/NAME.json);
- a `path` that is a Hugging Face cache snapshot: one built offline from the blob names,
  every time (its stamps are kept in the same file);
- otherwise none: there is nothing to verify against.

`pull` = metadata (pinned commit) -> incremental verification -> fetch of every file that is
not OK (resuming partials) -> the report. `verify --repair` = verification -> the same fetch,
against the manifest already pinned (no metadata call unless there is no manifest).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from sparkd.config import Config, ModelConfig
from sparkd.errors import ManifestError
from sparkd.store import hub
from sparkd.store.manifest import Manifest, ManifestStore, Stamp, carry_stamps
from sparkd.store.plan import (
    FetchSettings,
    RetryPolicy,
    VerifyReport,
    merge_verdicts,
    plan_fetch,
)
from sparkd.store.progress import NullReporter, Reporter
from sparkd.store.verify import scan_model_dir, verify_dir


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """Knobs of a pull or a repair, from [daemon] (tests pass a short backoff)."""

    fetch: FetchSettings = field(default_factory=FetchSettings)
    workers: int | None = None  # hashing threads (None: one per CPU)

    @classmethod
    def from_config(cls, config: Config) -> StoreSettings:
        d = config.daemon
        return cls(fetch=FetchSettings(
            concurrency=d.download_concurrency,
            stall_timeout_s=d.download_stall_timeout_s,
            policy=RetryPolicy(attempts=d.download_attempts),
            min_rate_bytes_per_s=d.download_min_rate_bytes_per_s,
        ))


def manifest_store(config: Config) -> ManifestStore:
    return ManifestStore(config.daemon.state_dir)


def has_manifest(config: Config, model: ModelConfig) -> bool:
    """Whether the model's files can be verified (a pulled manifest, or a cache snapshot)."""
    return hub.snapshot_commit(model.path) is not None or manifest_store(config).exists(
        model.name
    )


def requested_revision(model: ModelConfig) -> str:
    """What the config asks the source for: its `revision`, or the default branch."""
    return model.revision or "main"


def is_for(manifest: Manifest, model: ModelConfig) -> bool:
    """Whether the manifest is of the source and revision the config asks for now."""
    return (manifest.source == model.source
            and manifest.requested_revision == requested_revision(model))


def current_manifest(
    config: Config, model: ModelConfig, *, set_aside: bool = True
) -> tuple[Manifest | None, str]:
    """(the manifest, a note): None when there is none (the note says why)."""
    store = manifest_store(config)
    stored, warning = store.load(model.name, set_aside=set_aside)
    note = warning or ""
    if hub.snapshot_commit(model.path) is not None:
        fresh = hub.snapshot_manifest(model.name, model.path)
        return carry_stamps(stored, fresh), note
    if stored is None and not note:
        note = (
            f"no manifest for {model.name} ({store.path(model.name)})"
            + (f": run `sparkctl pull {model.name}`" if model.source else
               ": the model has no source and its path is not a Hugging Face cache snapshot")
        )
    return stored, note


def verify_model(
    config: Config,
    model: ModelConfig,
    *,
    full: bool = False,
    repair: bool = False,
    reporter: Reporter | None = None,
    settings: StoreSettings | None = None,
) -> VerifyReport:
    """Verify (incrementally unless `full`) and save the new stamps; with `repair`, fetch
    the BAD and MISSING files again. Raises ManifestError when there is no manifest."""
    reporter = reporter or NullReporter()
    settings = settings or StoreSettings.from_config(config)
    manifest, note = current_manifest(config, model)
    if manifest is None:
        raise ManifestError(note)
    report = verify_dir(model.path, manifest, full=full, workers=settings.workers,
                        reporter=reporter)
    assert report.manifest is not None
    if report.manifest != manifest or not manifest_store(config).exists(model.name):
        # Unchanged stamps: no write (an incremental check of a settled model is only stats).
        manifest_store(config).save(report.manifest)
    if repair and report.blocking:
        report = asyncio.run(repair_model(config, model, report, reporter=reporter,
                                          settings=settings))
    reporter.result(report)
    return report


def pull_model(
    config: Config,
    model: ModelConfig,
    *,
    reporter: Reporter | None = None,
    settings: StoreSettings | None = None,
) -> VerifyReport:
    """Fetch the model's manifest (pinned to a commit) and every file that does not verify.
    Raises HubError, ManifestError, DiskFull."""
    reporter = reporter or NullReporter()
    settings = settings or StoreSettings.from_config(config)
    if model.source is None:
        raise ManifestError(
            f"model {model.name} has no source to pull from "
            '(set models.NAME.source = "hf://ORG/REPO")'
        )
    store = manifest_store(config)
    old, _warning = store.load(model.name)
    requested = requested_revision(model)
    revision = requested
    if old is not None and is_for(old, model) and old.revision and not old.complete:
        # An unfinished pull goes on at the commit it started on, even if the branch moved:
        # its partial files are parts of that commit's files.
        revision = old.revision
    fresh = hub.fetch_manifest(
        model=model.name, source=model.source, revision=revision, patterns=model.files
    )
    manifest = carry_stamps(old, fresh)
    manifest = Manifest(
        model=manifest.model,
        source=manifest.source,
        requested_revision=requested,
        revision=manifest.revision,
        files=manifest.files,
    )
    store.save(manifest)
    report = verify_dir(model.path, manifest, workers=settings.workers, reporter=reporter)
    assert report.manifest is not None
    store.save(report.manifest)
    if report.blocking:
        report = asyncio.run(repair_model(config, model, report, reporter=reporter,
                                          settings=settings))
    reporter.result(report)
    return report


async def repair_model(
    config: Config,
    model: ModelConfig,
    report: VerifyReport,
    *,
    reporter: Reporter,
    settings: StoreSettings,
) -> VerifyReport:
    """Fetch the BAD and MISSING files of a verified report; the merged report. A
    coroutine: the daemon awaits it on its own loop, so a stopping daemon cancels it."""
    from sparkd.store.download import fetch_files

    manifest = report.manifest
    assert manifest is not None
    if manifest.source is None or manifest.source.startswith(hub.CACHE_SOURCE_PREFIX) or (
        manifest.revision is None
    ):
        if model.source is None:
            return _with_note(report, "cannot repair: the model has no source to fetch from")
        # A cache snapshot with a source: fetch from the Hub into the model's path is not
        # what a cache wants; refuse rather than write into someone else's cache.
        return _with_note(report, "cannot repair a Hugging Face cache snapshot in place")
    source, commit = manifest.source, manifest.revision
    jobs = plan_fetch(manifest, report.verdicts, scan_model_dir(model.path).local)
    outcomes = await fetch_files(
        jobs,
        root=model.path,
        url_for=lambda entry: hub.file_url(source, commit, entry.path),
        headers=hub.request_headers(),
        settings=settings.fetch,
        reporter=reporter,
        model=model.name,
    )
    stamps: dict[str, Stamp | None] = {o.verdict.path: o.stamp for o in outcomes}
    updated = manifest.with_stamps(stamps)
    manifest_store(config).save(updated)
    return VerifyReport(
        model=report.model,
        verdicts=merge_verdicts(report.verdicts, [o.verdict for o in outcomes]),
        manifest=updated,
        hashed_bytes=report.hashed_bytes,
        fetched_bytes=sum(o.transferred for o in outcomes),
        note=report.note,
    )


def _with_note(report: VerifyReport, note: str) -> VerifyReport:
    return VerifyReport(
        model=report.model,
        verdicts=report.verdicts,
        manifest=report.manifest,
        hashed_bytes=report.hashed_bytes,
        fetched_bytes=report.fetched_bytes,
        note=note,
    )


def describe_failures(report: VerifyReport) -> list[str]:
    """One line per file that is not OK: `BAD path: reason`."""
    return [f"{v.status.value} {v.path}: {v.reason}" for v in report.failures]
