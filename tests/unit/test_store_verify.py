"""Hashing and the directory scan (on tmp files), and the store's config keys."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from sparkd.config import parse_config
from sparkd.errors import ConfigError
from sparkd.store.manifest import FileEntry, Stamp, make_manifest
from sparkd.store.plan import Status
from sparkd.store.verify import hash_file, partial_path, scan_model_dir, verify_dir

SRC = Path("/etc/test.toml")


def test_git_blob_sha1_matches_git_hash_object() -> None:
    # `printf 'hello\n' | git hash-object --stdin`
    assert hashlib.sha1(b"blob 6\0hello\n").hexdigest() == (
        "ce013625030ba8dba906f756967f9e9ca394464a"
    )


def test_hash_file_reads_in_chunks_and_returns_a_stamp(tmp_path: Path) -> None:
    path = tmp_path / "f"
    data = os.urandom(3 * 1024 + 7)
    path.write_bytes(data)
    seen: list[int] = []
    digest, size, stamp = hash_file(path, "sha256", on_bytes=seen.append, buf_size=1024)
    assert digest == hashlib.sha256(data).hexdigest() and size == len(data)
    assert seen == [1024, 1024, 1024, 7]
    assert stamp == Stamp.of(path.stat())
    git, _, _ = hash_file(path, "git-sha1")
    assert git == hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def test_scan_tells_partials_from_files_and_follows_symlinks(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "a.bin").write_bytes(b"abc")
    partial_path(tmp_path / "sub" / "b.bin").write_bytes(b"12345")
    (tmp_path / "blob").write_bytes(b"xy")
    (tmp_path / "link").symlink_to(tmp_path / "blob")
    (tmp_path / "dangling").symlink_to(tmp_path / "nowhere")
    scan = scan_model_dir(tmp_path)
    assert scan.files == ("blob", "link", "sub/a.bin")
    assert scan.local.partials == {"sub/b.bin": 5}
    assert scan.local.stamps["link"] == scan.local.stamps["blob"]
    assert scan_model_dir(tmp_path / "absent").files == ()


def test_verify_dir_parallel_incremental_then_full(tmp_path: Path) -> None:
    blobs = {f"f{i}": os.urandom(1000 + i) for i in range(6)}
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
    m = make_manifest(
        model="m", source=None, requested_revision=None, revision=None,
        files=[FileEntry(n, len(d), "sha256", hashlib.sha256(d).hexdigest())
               for n, d in blobs.items()],
    )
    first = verify_dir(tmp_path, m, workers=3)
    assert first.ok and all(v.hashed for v in first.verdicts)
    assert first.manifest is not None and first.manifest.complete
    again = verify_dir(tmp_path, first.manifest)
    assert again.ok and not any(v.hashed for v in again.verdicts) and again.hashed_bytes == 0
    (tmp_path / "f2").write_bytes(b"\0" * len(blobs["f2"]))
    third = verify_dir(tmp_path, first.manifest)
    assert [(v.path, v.status) for v in third.failures] == [("f2", Status.BAD)]
    assert [v.path for v in third.verdicts if v.hashed] == ["f2"]
    assert third.manifest is not None and third.manifest.by_path["f2"].verified is None
    assert len([v for v in verify_dir(tmp_path, first.manifest, full=True).verdicts
                if v.hashed]) == 6


MODEL = '[models.a]\nengine = "vllm"\nport = 8001\n'


def test_store_config_keys_and_defaults() -> None:
    c = parse_config(
        '[daemon]\ndownload_concurrency = 8\ndownload_stall_timeout_s = 5\n' + MODEL
        + 'source = "hf://Qwen/Qwen3-30B-A3B"\nrevision = "main"\n'
        'files = ["*.safetensors", "*.json"]\nrepair = true\n',
        source=SRC,
    )
    a = c.models["a"]
    assert (a.source, a.files, a.repair) == (
        "hf://Qwen/Qwen3-30B-A3B", ("*.safetensors", "*.json"), True)
    assert c.daemon.download_concurrency == 8 and c.daemon.download_attempts == 8
    bare = parse_config(MODEL + 'source = "Qwen/Qwen3-30B-A3B"\n', source=SRC)
    assert bare.models["a"].source == "Qwen/Qwen3-30B-A3B"  # the Hub id alone is fine too
    d = parse_config(MODEL, source=SRC)
    assert d.models["a"].files == () and d.models["a"].repair is False
    assert d.daemon.download_concurrency == 4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ('source = "https://huggingface.co/Qwen/Qwen3"\n', 'models.a.source: expected a '
         'Hugging Face repository as "hf://ORG/REPO" (or "ORG/REPO"), got "https://'),
        ('files = "*.json"\n', "models.a.files: expected a list of glob patterns"),
        ('repair = "yes"\n', 'models.a.repair: expected true or false, got "yes"'),
    ],
)
def test_store_config_errors_name_the_key(extra: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(MODEL + extra, source=SRC)
    assert message in info.value.message


def test_download_concurrency_is_bounded() -> None:
    with pytest.raises(ConfigError, match=r"daemon\.download_concurrency: expected an integer"):
        parse_config("[daemon]\ndownload_concurrency = 0\n", source=SRC)


def test_files_are_hashed_in_parallel_threads(tmp_path: Path) -> None:
    import threading

    from sparkd.store.progress import NullReporter

    names: set[str] = set()
    barrier = threading.Barrier(2, timeout=5)

    class Recording(NullReporter):
        def advance(self, path: str, nbytes: int) -> None:
            if threading.current_thread().name not in names:
                names.add(threading.current_thread().name)
                barrier.wait()  # both threads must be hashing at once to get past this

    blobs = {f"f{i}": os.urandom(4096) for i in range(2)}
    for name, data in blobs.items():
        (tmp_path / name).write_bytes(data)
    m = make_manifest(
        model="m", source=None, requested_revision=None, revision=None,
        files=[FileEntry(n, len(d), "sha256", hashlib.sha256(d).hexdigest())
               for n, d in blobs.items()],
    )
    report = verify_dir(tmp_path, m, workers=2, reporter=Recording())
    assert report.ok and len(names) == 2 and all(n.startswith("sparkd-hash") for n in names)
