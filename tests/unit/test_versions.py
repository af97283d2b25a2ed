"""The versions table (pure) and version detection against real programs on this machine."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from sparkd.config import ModelConfig
from sparkd.engine.versions import (
    FIXTURE_VERSIONS,
    TABLE,
    detect_version,
    detect_versions,
    rules_for,
    version_key,
)


@pytest.mark.parametrize(("text", "release"), [
    ("0.34.0", (0, 34, 0)), ("b11434", (11434,)), ("11434", (11434,)),
    ("0.5.23.post1", (0, 5, 23)), ("v0.11.2", (0, 11, 2)), ("0.23.0rc1", (0, 23, 0)),
    ("0.34.0+cu130", (0, 34, 0)),
])
def test_version_key(text: str, release: tuple[int, ...]) -> None:
    assert version_key(text).release == release


def test_pre_releases_sort_before_their_release_and_post_after() -> None:
    """PEP 440 order (packaging.version): 0.11.2rc1 < 0.11.2 < 0.11.2.post1; a local
    version (a CUDA wheel's "+cu130") is the release it builds."""
    order = ["0.11.2.dev1", "0.11.2rc1", "0.11.2", "0.11.2+cu130", "0.11.2.post1", "0.11.3"]
    assert sorted(order, key=version_key) == order
    # 0.17.0rc1 is not yet 0.17.0: the rules before the --moe-backend flag.
    assert rules_for("vllm", "0.17.0rc1").rules.since == "0.12.0"


@pytest.mark.parametrize(("engine", "version", "since"), [
    ("vllm", "0.34.0+cu130", "0.24.0"),
    ("vllm", "0.26.0+cu129", "0.24.0"),
    ("sglang", "0.5.23+cu130", "0.5.5"),
])
def test_a_local_version_is_its_public_release(engine: str, version: str, since: str) -> None:
    resolved = rules_for(engine, version)
    assert resolved.known and resolved.rules.since == since


@pytest.mark.parametrize(("engine", "version"), [
    ("vllm", "b11434"), ("sglang", "b9093"), ("llamacpp", "0.34"), ("llamacpp", "0.34.0"),
    ("llamacpp", "b11434rc1"), ("vllm", "nightly"),
])
def test_a_version_of_another_engines_form_is_not_a_version(engine: str, version: str) -> None:
    resolved = rules_for(engine, version)
    assert not resolved.known
    assert resolved.warning is not None and "is not a version" in resolved.warning


@pytest.mark.parametrize(("engine", "version", "since", "warned"), [
    ("vllm", "0.11.2", "0.11.0", False),
    ("vllm", "0.16.0", "0.12.0", False),
    ("vllm", "0.17.0", "0.17.0", False),
    ("vllm", "0.23.9", "0.17.0", False),
    ("vllm", "0.24.0", "0.24.0", False),
    ("vllm", "0.34.0", "0.24.0", False),
    ("vllm", "0.34.1", "0.24.0", False),  # a patch release of the newest known minor
    ("vllm", "0.35.0", "0.24.0", True),
    ("vllm", "0.9.2", "0.11.0", True),
    ("vllm", None, "0.24.0", True),
    ("vllm", "nightly", "0.24.0", True),
    ("sglang", "0.5.4", "0.5.3", False),
    ("sglang", "0.5.5", "0.5.5", False),
    ("sglang", "0.5.23.post1", "0.5.5", False),
    ("llamacpp", "b9093", "9093", False),
    ("llamacpp", "11434", "11434", False),
    ("llamacpp", "12000", "11434", True),
])
def test_rules_for(engine: str, version: str | None, since: str, warned: bool) -> None:  # noqa: FBT001
    resolved = rules_for(engine, version)
    assert resolved.rules.since == since
    assert (resolved.warning is not None) is warned
    assert resolved.known is not warned


def test_every_rule_cites_its_source_and_the_table_is_ordered() -> None:
    for rule_sets, newest in TABLE.values():
        keys = [version_key(r.since) for r in rule_sets]
        assert keys == sorted(keys)
        assert version_key(newest) >= keys[-1]
        assert all(r.source for r in rule_sets)
    for engine, version in FIXTURE_VERSIONS:
        assert rules_for(engine, version).known, (engine, version)


def _script(path: Path, text: str) -> Path:
    path.write_text(text)
    path.chmod(0o755)
    return path


def test_detects_a_python_engine_from_its_package_metadata(tmp_path: Path) -> None:
    """A console script whose #! names a Python that sees a vllm 0.33.0 distribution: what
    `pip install vllm==0.33.0` leaves (the metadata is read, vllm is never imported)."""
    site = tmp_path / "site"
    dist = site / "vllm-0.33.0.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: vllm\nVersion: 0.33.0\n")
    python = _script(tmp_path / "python3",
                     f"#!/bin/sh\nPYTHONPATH={site} exec {sys.executable} \"$@\"\n")
    vllm = _script(tmp_path / "vllm", f"#!{python}\nraise SystemExit('never run')\n")
    model = ModelConfig(name="q", engine="vllm", path=Path("/m"), port=1, binary=str(vllm))
    assert detect_version(model) == "0.33.0"
    # SGLang given its Python as binary: asked in that Python.
    (site / "sglang-0.5.23.dist-info").mkdir()
    (site / "sglang-0.5.23.dist-info" / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: sglang\nVersion: 0.5.23\n")
    sg = ModelConfig(name="s", engine="sglang", path=Path("/m"), port=2, binary=str(python))
    pinned = ModelConfig(name="p", engine="vllm", path=Path("/m"), port=3, binary=str(vllm),
                         engine_version="0.11.2")
    assert detect_versions([model, sg, pinned]) == {"q": "0.33.0", "s": "0.5.23"}


def test_detects_llama_server_from_its_version_output(tmp_path: Path) -> None:
    # llama-server --version, on stderr: b11434 (common/build-info.cpp.in) prints the library's
    # version, then the build number; older builds printed the build number first.
    server = _script(tmp_path / "llama-server",
                     "#!/bin/sh\necho 'version: 0.6.0-dev (build 11434, commit 0a1b2c3)' >&2\n"
                     "echo 'built with cc (Debian 12.2.0-14) 12.2.0 for x86_64-linux-gnu' >&2\n")
    model = ModelConfig(name="g", engine="llamacpp", path=Path("/m.gguf"), port=1,
                        binary=str(server))
    assert detect_version(model) == "11434"
    old = _script(tmp_path / "llama-server-old", "#!/bin/sh\necho 'version: 4589 (abc1234)' >&2\n")
    assert detect_version(ModelConfig(name="o", engine="llamacpp", path=Path("/m.gguf"),
                                      port=2, binary=str(old))) == "4589"


def test_nothing_detected_without_the_engine(tmp_path: Path) -> None:
    missing = ModelConfig(name="q", engine="vllm", path=Path("/m"), port=1,
                          binary=str(tmp_path / "nope"))
    assert detect_version(missing) is None
    broken = _script(tmp_path / "vllm", "#!/bin/false\n")
    assert detect_version(ModelConfig(name="q", engine="vllm", path=Path("/m"), port=1,
                                      binary=str(broken))) is None
    assert os.path.exists(broken)
