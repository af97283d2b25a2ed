"""What `sparkctl models` says of each model's files, without reading a byte of them.

`files_state` is PURE: the manifest and a stat of the model directory in, a summary out,
decided the way an incremental `sparkctl verify` would decide (`plan_verify`): a file whose
stamp is the one it verified at is OK; one that changed since would be hashed again; a wrong
size is BAD; an absent one MISSING (a partial download counts its bytes). `model_files` is
the adapter: it reads the manifest (never setting one aside: this is a look, not a repair)
and stats the directory.

    state        meaning                                          what to run
    verified     every file unchanged since it verified
    changed      some files changed (or never verified) since     sparkctl verify NAME
    incomplete   some files are missing (a pull not finished)     sparkctl pull NAME
    bad          some files have the wrong size                   sparkctl verify NAME --repair
    unknown      no usable manifest, or one that lists no files, or sparkctl pull NAME
                 a directory that cannot be read (the note says why)
    external     an engine sparkd does not run: no files of its own

`stale` is set (whatever the state) when the manifest is of another source or revision than
the config now asks for: the files may all be right, for the old one (next: sparkctl pull).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace
from typing import Any, Literal

from sparkd.config import Config, ModelConfig
from sparkd.store.manifest import Manifest
from sparkd.store.plan import LocalView, Status, plan_verify

FilesStateName = Literal["verified", "changed", "incomplete", "bad", "unknown", "external"]


@dataclass(frozen=True, slots=True)
class FilesState:
    state: FilesStateName
    files: int = 0  # in the manifest
    ok: int = 0  # unchanged since verified
    changed: int = 0  # would be hashed by the next incremental verify
    missing: int = 0
    bad: int = 0
    expected_bytes: int = 0
    present_bytes: int = 0  # of the manifest's files, partial downloads included
    revision: str | None = None
    stale: bool = False  # the manifest is of another source or revision than the config's
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def files_state(manifest: Manifest, local: LocalView) -> FilesState:
    if not manifest.files:
        # Nothing to be wrong is not the same as verified (a cache snapshot not downloaded).
        return FilesState("unknown", revision=manifest.revision,
                          note="the manifest lists no files")
    plan = plan_verify(manifest, local, full=False)
    counts = {status: 0 for status in Status}
    for verdict in plan.settled:
        counts[verdict.status] += 1
    present = sum(
        local.stamps[e.path].size if e.path in local.stamps else local.partials.get(e.path, 0)
        for e in manifest.files
    )
    state: FilesStateName
    if counts[Status.BAD]:
        state = "bad"
    elif counts[Status.MISSING]:
        state = "incomplete"
    elif plan.to_hash:
        state = "changed"
    else:
        state = "verified"
    return FilesState(
        state=state,
        files=len(manifest.files),
        ok=counts[Status.OK],
        changed=len(plan.to_hash),
        missing=counts[Status.MISSING],
        bad=counts[Status.BAD],
        expected_bytes=manifest.total_bytes,
        present_bytes=present,
        revision=manifest.revision,
    )


def stale_note(manifest: Manifest, model: ModelConfig) -> str:
    """Why the manifest is not the one the config asks for ("" when it is)."""
    from sparkd.store.model import is_for, requested_revision

    if model.source is None or is_for(manifest, model):
        return ""  # (a cache snapshot's manifest is made from the snapshot itself)
    return (f"the manifest is of {manifest.source} at {manifest.requested_revision}; the config"
            f" asks for {model.source} at {requested_revision(model)}")


def model_files(config: Config, model: ModelConfig) -> FilesState:
    """Never raises for one model's trouble: a listing of ten models shows the other nine."""
    from sparkd.errors import SparkdError
    from sparkd.store.model import current_manifest
    from sparkd.store.verify import scan_model_dir

    if model.engine == "external":
        return FilesState("external", note="an external engine: sparkd keeps no files of it")
    try:
        manifest, note = current_manifest(config, model, set_aside=False)
        if manifest is None:
            return FilesState("unknown", note=note)
        if not model.path.is_dir():
            state = files_state(manifest, LocalView(stamps={}))
            note = (f"{model.path} is not a directory" if model.path.exists()
                    else f"{model.path} does not exist")
        else:
            state = files_state(manifest, scan_model_dir(model.path).local)
            note = state.note
    except (OSError, SparkdError) as exc:
        why = getattr(exc, "message", None) or str(exc)
        return FilesState("unknown", note=f"cannot read {model.path}: {why}")
    stale = stale_note(manifest, model)
    return replace(state, stale=bool(stale), note="; ".join(filter(None, [note, stale])))
