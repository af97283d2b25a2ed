"""Writing into a model directory without following links (issue 10).

`sparkctl pull` runs as root, and a model directory may be writable by someone else (the
engine user owned `/var/lib/sparkd/models` up to 0.1.0; an administrator may hand a directory
to anyone). A `.NAME.part` symlink planted there made a root pull overwrite the link's target.
So every file the store creates, truncates, renames or removes below the model directory is
reached through directory descriptors, one path component at a time, each opened with
`O_NOFOLLOW` (`openat`, `mkdirat`, `renameat`, `unlinkat` through Python's `dir_fd=`): a
symlink, a hard-linked partial file, a partial that is not a regular file or that belongs to
another user is refused with its path, and nothing outside the directory is touched, even if
links are swapped in while the pull runs.

The model directory itself is opened with `O_NOFOLLOW` too: a model `path` that is a symbolic
link is refused (point the configuration at the directory itself). The components above it are
the administrator's configuration and are followed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Final

from sparkd.errors import SparkdError

_DIR_FLAGS: Final = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_FILE_FLAGS: Final = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC


class UnsafePath(SparkdError):
    """A link (or another file that is not sparkd's to write) where the store writes."""

    code = "unsafe-path"


def _refuse_link(path: Path, what: str) -> UnsafePath:
    return UnsafePath(
        f"{path}: expected {what}, found a symbolic link; sparkd never writes through links "
        "(a link planted there could aim a root pull at any file): remove it, or point the "
        "model's path at the real directory"
    )


def _not_a_directory(exc: OSError, path: Path, what: str,
                     lstat: Callable[[Path], os.stat_result]) -> OSError | UnsafePath:
    """The error for a directory that O_DIRECTORY|O_NOFOLLOW would not open: a link (Linux
    says ENOTDIR for a link to a directory, ELOOP for one to anything else), a file, or the
    OSError itself."""
    if exc.errno not in (errno.ELOOP, errno.ENOTDIR):
        return exc
    try:
        is_link = stat.S_ISLNK(lstat(path).st_mode)
    except OSError:
        return exc
    if is_link:
        return _refuse_link(path, what)
    return UnsafePath(f"{path}: expected {what}, found a file")


def _lstat_at(dir_fd: int, name: str) -> Callable[[Path], os.stat_result]:
    def lstat(_path: Path) -> os.stat_result:
        return os.stat(name, dir_fd=dir_fd, follow_symlinks=False)

    return lstat


def open_root(root: Path) -> int:
    """A descriptor of the model directory (created when missing), never through a link."""
    root.parent.mkdir(parents=True, exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(root, 0o755)
    try:
        return os.open(root, _DIR_FLAGS)
    except OSError as exc:
        raise _not_a_directory(exc, root, "the model directory", os.lstat) from None


def open_subdir(root_fd: int, root: Path, parts: Sequence[str]) -> int:
    """A descriptor of ROOT/PARTS..., each component created when missing and opened
    without following a link. The caller closes it."""
    fd = os.dup(root_fd)
    where = root
    try:
        for part in parts:
            where = where / part
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise _not_a_directory(exc, where, "a directory",
                                       _lstat_at(fd, part)) from None
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def refuse_link(dir_fd: int, name: str, path: Path) -> None:
    """Refuse a symbolic link where the store will put a file (`path` names it)."""
    try:
        st = os.stat(name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return
    if stat.S_ISLNK(st.st_mode):
        raise _refuse_link(path, "a file")


def open_partial(dir_fd: int, name: str, path: Path) -> int:
    """The partial file `name` in `dir_fd`, created when missing, read-write, never through a
    link; refused when it is not a regular file of this user's with a single link."""
    try:
        fd = os.open(name, _FILE_FLAGS, 0o644, dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise _refuse_link(path, "a partial download") from None
        raise
    try:
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif st.st_nlink != 1:
            # A hard link to another file: writing would change that file.
            problem = f"has {st.st_nlink} hard links"
        elif st.st_uid != os.geteuid():
            # Its owner could change its bytes after they were hashed.
            problem = f"belongs to uid {st.st_uid}, not to the user pulling (uid {os.geteuid()})"
        if problem is not None:
            raise UnsafePath(f"{path}: the partial download {problem}: remove it and pull again")
    except BaseException:
        os.close(fd)
        raise
    return fd
