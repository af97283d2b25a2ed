"""A model's manifest: what each file must be, and when it last proved to be that.

For every file: its path inside the model directory, its size, the digest it must have (the
SHA-256 of an LFS file, or the git blob SHA-1 of a small file kept in git), and the stamp
(size, mtime_ns, inode) it had when it last verified. A file whose stamp is unchanged is not
read again by an incremental verification; any write, truncation or replacement changes one
of the three.

`parse_manifest` and `render_manifest` are pure (JSON text <-> `Manifest`); `ManifestStore`
owns the files under `STATE_DIR/manifests/NAME.json`, written with `atomic_write`. A manifest
that does not parse is renamed aside (`NAME.json.corrupt-<UTC time>`), never deleted.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import logging
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Final, Literal

from sparkd.atomic import atomic_write
from sparkd.errors import ManifestError

log = logging.getLogger(__name__)

SCHEMA: Final = 1
MANIFEST_DIR: Final = "manifests"

Algorithm = Literal["sha256", "git-sha1"]
_HEX_LEN: Final[dict[str, int]] = {"sha256": 64, "git-sha1": 40}
_HEX_RE: Final = re.compile(r"[0-9a-f]+")


@dataclass(frozen=True, slots=True)
class Stamp:
    """What a file looked like when it last verified. Any change means: hash it again."""

    size: int
    mtime_ns: int
    inode: int

    @classmethod
    def of(cls, st: os.stat_result) -> Stamp:
        return cls(size=st.st_size, mtime_ns=st.st_mtime_ns, inode=st.st_ino)


@dataclass(frozen=True, slots=True)
class FileEntry:
    path: str  # relative, POSIX separators, never absolute, never "..": see check_relpath
    size: int
    algorithm: Algorithm
    digest: str  # lowercase hex
    verified: Stamp | None = None

    def with_stamp(self, stamp: Stamp | None) -> FileEntry:
        return dataclasses.replace(self, verified=stamp)

    def same_content(self, other: FileEntry) -> bool:
        return (self.size, self.algorithm, self.digest) == (
            other.size,
            other.algorithm,
            other.digest,
        )


@dataclass(frozen=True, slots=True)
class Manifest:
    model: str
    source: str | None  # "hf://ORG/REPO", or "hf-cache:PATH" for a verified-offline snapshot
    requested_revision: str | None  # what the config asked for (a branch, tag or commit)
    revision: str | None  # the commit it resolved to, pinned
    files: tuple[FileEntry, ...]  # sorted by path

    def __post_init__(self) -> None:
        paths = [f.path for f in self.files]
        if paths != sorted(set(paths)):
            raise ValueError("manifest files must be sorted by path and unique")

    @property
    def by_path(self) -> dict[str, FileEntry]:
        return {f.path: f for f in self.files}

    @property
    def total_bytes(self) -> int:
        return sum(f.size for f in self.files)

    @property
    def complete(self) -> bool:
        """Every file has verified at least once."""
        return all(f.verified is not None for f in self.files)

    def with_stamps(self, stamps: Mapping[str, Stamp | None]) -> Manifest:
        """The manifest with the given files' stamps replaced (None: not verified)."""
        files = tuple(f.with_stamp(stamps[f.path]) if f.path in stamps else f for f in self.files)
        return dataclasses.replace(self, files=files)


def make_manifest(
    *,
    model: str,
    source: str | None,
    requested_revision: str | None,
    revision: str | None,
    files: Iterable[FileEntry],
) -> Manifest:
    return Manifest(
        model=model,
        source=source,
        requested_revision=requested_revision,
        revision=revision,
        files=tuple(sorted(files, key=lambda f: f.path)),
    )


def carry_stamps(old: Manifest | None, new: Manifest) -> Manifest:
    """A new manifest (e.g. after a branch moved) keeps the stamps of files whose expected
    content did not change, so an unchanged shard is not hashed again."""
    if old is None:
        return new
    before = old.by_path
    stamps: dict[str, Stamp | None] = {}
    for entry in new.files:
        prev = before.get(entry.path)
        stamps[entry.path] = prev.verified if prev and prev.same_content(entry) else None
    return new.with_stamps(stamps)


def check_relpath(path: str) -> str:
    """A repository path that stays inside the model directory, or ValueError."""
    pure = PurePosixPath(path)
    if (
        not path
        or pure.is_absolute()
        or any(part in ("", ".", "..") for part in path.split("/"))
        or "\0" in path
    ):
        raise ValueError(f"unsafe file path {path!r}")
    return path


def check_digest(algorithm: str, digest: str) -> str:
    if algorithm not in _HEX_LEN:
        raise ValueError(f"unknown algorithm {algorithm!r}")
    if len(digest) != _HEX_LEN[algorithm] or not _HEX_RE.fullmatch(digest):
        raise ValueError(f"not a {algorithm} hex digest: {digest!r}")
    return digest


# --- JSON (pure) ------------------------------------------------------------------------------


def render_manifest(manifest: Manifest) -> str:
    data: dict[str, Any] = {
        "schema": SCHEMA,
        "model": manifest.model,
        "source": manifest.source,
        "requested_revision": manifest.requested_revision,
        "revision": manifest.revision,
        "files": [
            {
                "path": f.path,
                "size": f.size,
                "algorithm": f.algorithm,
                "digest": f.digest,
                "verified": (
                    None
                    if f.verified is None
                    else {
                        "size": f.verified.size,
                        "mtime_ns": f.verified.mtime_ns,
                        "inode": f.verified.inode,
                    }
                ),
            }
            for f in manifest.files
        ],
    }
    return json.dumps(data, indent=1) + "\n"


def parse_manifest(text: str) -> Manifest:
    """Raises ManifestError saying what is wrong."""
    try:
        raw = json.loads(text)
    except ValueError as exc:
        raise ManifestError(f"not valid JSON: {exc}") from None
    try:
        if not isinstance(raw, dict):
            raise TypeError("not a JSON object")
        if raw.get("schema") != SCHEMA:
            raise ValueError(f"schema {raw.get('schema')!r} is not {SCHEMA}")
        files = [_parse_entry(item) for item in _typed(raw, "files", list)]
        return make_manifest(
            model=_typed(raw, "model", str),
            source=_typed(raw, "source", str, optional=True),
            requested_revision=_typed(raw, "requested_revision", str, optional=True),
            revision=_typed(raw, "revision", str, optional=True),
            files=files,
        )
    except (TypeError, ValueError, KeyError) as exc:
        raise ManifestError(str(exc)) from None


def _typed(raw: Mapping[str, Any], key: str, kind: type, *, optional: bool = False) -> Any:
    value = raw.get(key) if optional else raw[key]
    if value is None and optional:
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise TypeError(f"{key}: expected {kind.__name__}, got {value!r}")
    return value


def _parse_entry(item: Any) -> FileEntry:
    if not isinstance(item, dict):
        raise TypeError(f"file entry: expected an object, got {item!r}")
    algorithm = _typed(item, "algorithm", str)
    size = _typed(item, "size", int)
    if size < 0:
        raise ValueError(f"negative size {size}")
    stamp_raw = _typed(item, "verified", dict, optional=True)
    stamp = (
        None
        if stamp_raw is None
        else Stamp(
            size=_typed(stamp_raw, "size", int),
            mtime_ns=_typed(stamp_raw, "mtime_ns", int),
            inode=_typed(stamp_raw, "inode", int),
        )
    )
    return FileEntry(
        path=check_relpath(_typed(item, "path", str)),
        size=size,
        algorithm=algorithm,
        digest=check_digest(algorithm, _typed(item, "digest", str)),
        verified=stamp,
    )


# --- the files --------------------------------------------------------------------------------


class ManifestStore:
    """`STATE_DIR/manifests/NAME.json`, one per model."""

    def __init__(self, state_dir: Path, *, now: dt.datetime | None = None) -> None:
        self.directory = state_dir / MANIFEST_DIR
        self._now = now

    def path(self, model: str) -> Path:
        return self.directory / f"{model}.json"

    def exists(self, model: str) -> bool:
        return self.path(model).is_file()

    def load(
        self, model: str, *, set_aside: bool = True
    ) -> tuple[Manifest | None, str | None]:
        """The manifest (None when there is none) and, when the file was unusable, a message
        saying where it was kept. `set_aside=False` (a read-only look, `sparkctl models`)
        leaves an unusable file where it is and only says what is wrong with it."""
        path = self.path(model)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None, None
        except (OSError, UnicodeDecodeError) as exc:
            problem = f"unreadable: {exc}"
        else:
            try:
                manifest = parse_manifest(text)
            except ManifestError as exc:
                problem = exc.message
            else:
                if manifest.model == model:
                    return manifest, None
                problem = f"it is the manifest of {manifest.model!r}"
        if not set_aside:
            return None, f"manifest {path} is unusable ({problem})"
        return None, self._set_aside(path, problem)

    def save(self, manifest: Manifest) -> None:
        path = self.path(manifest.model)
        try:
            atomic_write(path, render_manifest(manifest).encode(), mode=0o644)
        except OSError as exc:
            raise ManifestError(f"cannot write {path}: {exc}") from exc

    def _set_aside(self, path: Path, reason: str) -> str:
        now = self._now or dt.datetime.now(dt.UTC)
        stem = f"{path.name}.corrupt-{now:%Y%m%dT%H%M%SZ}"
        aside = path.with_name(stem)
        n = 1
        while aside.exists():
            aside = path.with_name(f"{stem}.{n}")
            n += 1
        path.rename(aside)
        message = f"manifest {path} was unusable ({reason}); kept it as {aside}"
        log.error("%s", message)
        return message
