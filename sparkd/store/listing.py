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
    unknown      no usable manifest (the note says why)           sparkctl pull NAME
    external     an engine sparkd does not run: no files of its own
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
    note: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def files_state(manifest: Manifest, local: LocalView) -> FilesState:
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


def model_files(config: Config, model: ModelConfig) -> FilesState:
    from sparkd.store.model import current_manifest
    from sparkd.store.verify import scan_model_dir

    if model.engine == "external":
        return FilesState("external", note="an external engine: sparkd keeps no files of it")
    manifest, note = current_manifest(config, model, set_aside=False)
    if manifest is None:
        return FilesState("unknown", note=note)
    return files_state(manifest, scan_model_dir(model.path).local)
