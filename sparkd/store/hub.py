"""Where a model's files come from: the Hub's metadata (through huggingface_hub), and a local
Hugging Face cache snapshot verified offline.

Hub: `HfApi.model_info(repo, revision=..., files_metadata=True)` lists every file with its
size and its expected hash (an LFS file's SHA-256, a small file's git blob SHA-1) and resolves
the revision to a commit, which the manifest pins: every file is fetched from that commit, so a
branch that moves during a pull cannot mix two versions. huggingface_hub reads `HF_ENDPOINT`
once, at import (`huggingface_hub.constants.ENDPOINT`); sparkd reads it at each call and passes
it as `endpoint=`, so a test (or an operator's shell) that sets it later is honoured. `HF_TOKEN`
is read by huggingface_hub itself (`build_hf_headers`).

Cache snapshot: a `path` like `.../models--ORG--REPO/snapshots/COMMIT` holds symlinks into
`../../blobs/`, and a blob's name is its expected hash (SHA-256 for LFS files, the git blob
SHA-1 for the rest; FACTS.md, Model downloads). Nothing needs the network.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from sparkd import __version__
from sparkd.errors import HubError
from sparkd.store.manifest import Algorithm, FileEntry, Manifest, check_relpath, make_manifest

HF_SCHEME: Final = "hf://"
CACHE_SOURCE_PREFIX: Final = "hf-cache:"
_SHA256_RE: Final = re.compile(r"[0-9a-f]{64}")
_SHA1_RE: Final = re.compile(r"[0-9a-f]{40}")


def repo_id(source: str) -> str:
    """"hf://ORG/REPO" (or the bare "ORG/REPO") -> "ORG/REPO" (the config validated it)."""
    repo = source.removeprefix(HF_SCHEME)
    if repo.startswith(CACHE_SOURCE_PREFIX) or repo.count("/") != 1:
        raise HubError(f"{source!r} is not a Hugging Face repository (hf://ORG/REPO)")
    return repo


def endpoint() -> str | None:
    """$HF_ENDPOINT at call time (None: huggingface_hub's default, https://huggingface.co)."""
    value = os.environ.get("HF_ENDPOINT", "").strip().rstrip("/")
    return value or None


@dataclass(frozen=True, slots=True)
class RemoteFile:
    path: str
    size: int
    algorithm: Algorithm
    digest: str


def select(paths: Sequence[str], patterns: Sequence[str]) -> set[str]:
    """The paths matching any pattern (all when there is none), as huggingface_hub's own
    `allow_patterns` matches them."""
    from huggingface_hub.utils import filter_repo_objects  # type: ignore[attr-defined]

    return set(filter_repo_objects(paths, allow_patterns=list(patterns) or None))


def fetch_manifest(
    *, model: str, source: str, revision: str | None, patterns: Sequence[str] = ()
) -> Manifest:
    """The manifest of `source` at `revision` (default "main"), pinned to its commit.
    Raises HubError with the reason."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo = repo_id(source)
    wanted = revision or "main"
    where = endpoint() or "https://huggingface.co"
    try:
        info = HfApi(endpoint=endpoint()).model_info(repo, revision=wanted, files_metadata=True)
    except GatedRepoError:
        raise HubError(f"{source}: gated repository: accept its terms and set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise HubError(f"{source}: no revision {wanted!r} at {where}") from None
    except RepositoryNotFoundError:
        raise HubError(
            f"{source}: no such repository at {where} (or it is private: set HF_TOKEN)"
        ) from None
    except HfHubHTTPError as exc:
        raise HubError(f"{source}: the Hub answered an error: {exc}") from None
    except OSError as exc:  # connection refused, DNS, TLS
        raise HubError(f"{source}: cannot reach {where}: {exc}") from None
    except Exception as exc:  # httpx's transport errors are not OSErrors
        if type(exc).__module__.startswith(("httpx", "httpcore")):
            raise HubError(f"{source}: cannot reach {where}: {exc}") from None
        raise
    if not info.sha or not info.siblings:
        raise HubError(f"{source}@{wanted}: the Hub listed no commit or no files")
    remote = [_remote_file(source, s.rfilename, s.size, s.blob_id, s.lfs) for s in info.siblings]
    chosen = select([r.path for r in remote], patterns)
    if not chosen:
        raise HubError(f"{source}@{wanted}: no file matches files = {list(patterns)}")
    return make_manifest(
        model=model,
        source=source,
        requested_revision=wanted,
        revision=info.sha,
        files=[
            FileEntry(path=r.path, size=r.size, algorithm=r.algorithm, digest=r.digest)
            for r in remote
            if r.path in chosen
        ],
    )


def _remote_file(
    source: str, path: str, size: int | None, blob_id: str | None, lfs: object
) -> RemoteFile:
    try:
        check_relpath(path)
    except ValueError as exc:
        raise HubError(f"{source}: refusing {exc}") from None
    if lfs is not None:
        sha256 = getattr(lfs, "sha256", None)
        lfs_size = getattr(lfs, "size", None)
        if not isinstance(sha256, str) or not _SHA256_RE.fullmatch(sha256) or lfs_size is None:
            raise HubError(f"{source}: {path}: the Hub gave no usable LFS SHA-256")
        return RemoteFile(path, int(lfs_size), "sha256", sha256)
    if blob_id is None or not _SHA1_RE.fullmatch(blob_id) or size is None:
        raise HubError(f"{source}: {path}: the Hub gave no size and blob id (files_metadata)")
    return RemoteFile(path, int(size), "git-sha1", blob_id)


def file_url(source: str, commit: str, path: str) -> str:
    """The file's resolve URL at the pinned commit (the Hub redirects it to its CDN)."""
    from huggingface_hub import hf_hub_url

    return hf_hub_url(repo_id(source), path, revision=commit, endpoint=endpoint())


def request_headers() -> dict[str, str]:
    """User agent and, when there is a token (HF_TOKEN or `hf auth login`), Authorization.
    aiohttp drops Authorization when a redirect leaves the Hub's origin (the CDN)."""
    from huggingface_hub.utils import build_hf_headers  # type: ignore[attr-defined]

    headers = build_hf_headers(library_name="sparkd", library_version=__version__)
    headers["Accept-Encoding"] = "identity"  # the bytes as stored: they are what is hashed
    return headers


# --- Hugging Face cache snapshots -----------------------------------------------------------


def snapshot_commit(path: Path) -> str | None:
    """The commit when `path` is `.../models--ORG--REPO/snapshots/COMMIT`, else None."""
    if path.parent.name == "snapshots" and path.parent.parent.name.startswith("models--"):
        return path.name
    return None


def snapshot_manifest(model: str, path: Path) -> Manifest:
    """The manifest a snapshot proves offline: each symlink into blobs/ whose blob is named
    like a hash. A plain file (or a link to something else) is in no manifest: it will show
    as EXTRA, since nothing says what it should be."""
    commit = snapshot_commit(path)
    if commit is None:
        raise HubError(f"{path} is not a Hugging Face cache snapshot")
    files: list[FileEntry] = []
    for dirpath, _dirs, names in os.walk(path):
        for name in names:
            link = Path(dirpath, name)
            if not link.is_symlink():
                continue
            blob = Path(os.readlink(link)).name
            algorithm: Algorithm
            if _SHA256_RE.fullmatch(blob):
                algorithm = "sha256"
            elif _SHA1_RE.fullmatch(blob):
                algorithm = "git-sha1"
            else:
                continue
            try:
                size = link.stat().st_size
            except FileNotFoundError:
                size = 0  # dangling: MISSING, whatever the size
            rel = link.relative_to(path).as_posix()
            files.append(FileEntry(path=rel, size=size, algorithm=algorithm, digest=blob))
    repo = path.parent.parent.name.removeprefix("models--").replace("--", "/")
    return make_manifest(
        model=model,
        source=f"{CACHE_SOURCE_PREFIX}{repo}",
        requested_revision=commit,
        revision=commit,
        files=files,
    )
