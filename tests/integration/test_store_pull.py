"""`sparkctl pull` / `verify` against a local hub on loopback (tests/integration/hubserver.py),
with the faults the issue lists. For each: the pull ends with every file correct, only the
damaged file is fetched again, and a resumed transfer asks only for the bytes not on disk."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from hubserver import (
    FakeHub,
    Fault,
    corrupt,
    cut,
    ignore_range,
    run_hub,
    short,
    slow,
    stall,
    status,
)

from sparkd.config import Config, load_config
from sparkd.ctl.exits import ExitStatus
from sparkd.ctl.main import cli
from sparkd.errors import DiskFull, VerificationFailed
from sparkd.store.manifest import ManifestStore
from sparkd.store.model import StoreSettings, pull_model, verify_model
from sparkd.store.modeldir import UnsafePath
from sparkd.store.plan import FetchSettings, RetryPolicy, Status
from sparkd.store.preflight import preflight_verify, preflight_verify_async

REPO = "acme/tiny-llm"
MIB = 1 << 20
SHARD1 = "model-00001-of-00003.safetensors"
SHARD2 = "model-00002-of-00003.safetensors"
SHARD3 = "model-00003-of-00003.safetensors"


def _files() -> dict[str, bytes]:
    rng = random.Random(4)
    return {
        "config.json": b'{"architectures": ["TinyForCausalLM"], "hidden_size": 64}\n',
        "tokenizer.json": rng.randbytes(50 * 1024),
        SHARD1: rng.randbytes(6 * MIB),
        SHARD2: rng.randbytes(5 * MIB + 123),
        f"nested/{SHARD3}": rng.randbytes(3 * MIB),
    }


FILES = _files()
TOTAL = sum(len(d) for d in FILES.values())
FAST = StoreSettings(fetch=FetchSettings(
    concurrency=2,
    stall_timeout_s=5.0,  # generous: a loaded CI machine must not look like a stall
    policy=RetryPolicy(attempts=6, base_s=0.01, cap_s=0.05),
))
STALL_S = 1.0  # the stall test's timeout; its server goes quiet for longer


@pytest.fixture(scope="module")
def hub_server() -> Iterator[FakeHub]:
    yield from run_hub()


@pytest.fixture
def hub(hub_server: FakeHub, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    hub_server.repos.clear()
    hub_server.faults.clear()
    hub_server.reset_log()
    hub_server.add_repo(REPO, FILES)
    monkeypatch.setenv("HF_ENDPOINT", hub_server.endpoint)
    monkeypatch.setenv("HF_TOKEN", "hf_test_token")
    monkeypatch.setenv("HF_HUB_DISABLE_TELEMETRY", "1")
    yield hub_server
    assert not any(hub_server.faults.values()), f"faults not used: {hub_server.faults}"


def write_config(tmp_path: Path, *, repair: bool = False, model_dir: Path | None = None,
                 extra: str = "") -> Path:
    path = tmp_path / "sparkd.toml"
    model_dir = model_dir or tmp_path / "models" / "tiny"
    path.write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\ndownload_stall_timeout_s = 5\n'
        f"settle_timeout_s = 0\nmemory_reserve_gib = 0\n\n"
        f'[models.tiny]\nengine = "vllm"\nport = 8301\npath = "{model_dir}"\n'
        f'source = "hf://{REPO}"\nrepair = {"true" if repair else "false"}\n{extra}'
    )
    return path


@pytest.fixture
def config(tmp_path: Path) -> Config:
    return load_config(write_config(tmp_path))


def assert_all_correct(config: Config) -> None:
    root = config.model("tiny").path
    for name, data in FILES.items():
        assert (root / name).read_bytes() == data, name
    assert not list(root.rglob("*.part")), "partial files left behind"


def bodies(hub: FakeHub) -> dict[str, list[tuple[int | None, int, int]]]:
    """file -> [(range start, status, bytes sent)] of the requests that carried its bytes."""
    out: dict[str, list[tuple[int | None, int, int]]] = {}
    for e in hub.body_requests():
        assert e.file is not None
        out.setdefault(e.file, []).append((e.range_start, e.status, e.sent))
    return out


def test_pull_fetches_every_file_once_and_a_second_pull_reads_nothing(
    hub: FakeHub, config: Config
) -> None:
    report = pull_model(config, config.model("tiny"), settings=FAST)
    assert report.ok, report.failures
    assert report.fetched_bytes == TOTAL
    assert_all_correct(config)
    got = bodies(hub)
    assert sorted(got) == sorted(FILES)
    assert all(len(reqs) == 1 and reqs[0][0] is None for reqs in got.values())
    # The token goes to the Hub, never to the CDN the Hub redirects to (another origin).
    assert all(e.authorized for e in hub.log if e.origin == "hub")
    cdn = [e for e in hub.log if e.origin == "cdn"]
    assert cdn and not any(e.authorized for e in cdn)
    manifest, _ = ManifestStore(config.daemon.state_dir).load("tiny")
    assert manifest is not None and manifest.revision == hub.repos[REPO].commit
    assert manifest.requested_revision == "main"
    assert {f.path: f.algorithm for f in manifest.files}["config.json"] == "git-sha1"
    assert manifest.complete

    hub.reset_log()
    again = pull_model(config, config.model("tiny"), settings=FAST)
    assert again.ok and again.fetched_bytes == 0 and again.hashed_bytes == 0
    assert hub.body_requests() == []


@pytest.mark.parametrize(
    ("faults", "resumed"),
    [
        pytest.param([cut(2 * MIB)], True, id="connection-closed-mid-body"),
        pytest.param([short(3 * MIB)], True, id="fewer-bytes-than-content-length"),
        pytest.param([stall(MIB, 2.5 * STALL_S)], True, id="stall"),
        pytest.param([corrupt()], False, id="same-size-corrupted"),
        pytest.param([status(503), status(502), status(503)], False, id="5xx-burst"),
    ],
)
@pytest.mark.parametrize("batch", [None, 64 * 1024], ids=["4MiB-batches", "64KiB-batches"])
def test_each_fault_ends_with_every_file_correct_and_only_the_damaged_one_refetched(
    hub: FakeHub, config: Config, faults: list[Fault], monkeypatch: pytest.MonkeyPatch, *,
    resumed: bool, batch: int | None
) -> None:
    if batch is not None:
        # Small batches: dozens per file, several in flight at once when the fault strikes.
        import sparkd.store.download

        monkeypatch.setattr(sparkd.store.download, "BATCH", batch)
    hub.inject(SHARD2, *faults)
    stalls = any(f.kind == "stall" for f in faults)
    settings = dataclasses.replace(
        FAST, fetch=dataclasses.replace(FAST.fetch, stall_timeout_s=STALL_S)) if stalls else FAST
    report = pull_model(config, config.model("tiny"), settings=settings)
    assert report.ok, report.failures
    assert_all_correct(config)
    got = bodies(hub)
    for name in FILES:
        if name != SHARD2:
            assert got[name] == [(None, 200, len(FILES[name]))], name
    shard = got[SHARD2]
    size = len(FILES[SHARD2])
    if resumed:
        (first_start, _, first_sent), (start, code, sent) = shard
        assert first_start is None and 0 < first_sent < size
        # The retry asked for exactly what was missing: from the bytes on disk to the end,
        # and nothing was received twice.
        assert code == 206 and start is not None and 0 < start <= first_sent
        assert start + sent == size
        assert report.fetched_bytes == TOTAL
    else:
        assert len(shard) == len(faults) + 1
        assert all(start is None for start, _, _ in shard)  # the whole file each time
        assert shard[-1] == (None, 200, size)


def test_range_requests_for_small_files_and_resume_across_runs(
    hub: FakeHub, config: Config
) -> None:
    """A partial file from an earlier run is hashed again from disk and then resumed."""
    root = config.model("tiny").path
    part = root / f".{SHARD1}.part"
    part.parent.mkdir(parents=True)
    keep = 4 * MIB + 17
    part.write_bytes(FILES[SHARD1][:keep])
    report = pull_model(config, config.model("tiny"), settings=FAST)
    assert report.ok
    assert bodies(hub)[SHARD1] == [(keep, 206, len(FILES[SHARD1]) - keep)]
    assert report.fetched_bytes == TOTAL - keep


def test_a_partial_file_with_wrong_bytes_is_fetched_again_whole(
    hub: FakeHub, config: Config
) -> None:
    root = config.model("tiny").path
    part = root / f".{SHARD1}.part"
    part.parent.mkdir(parents=True)
    part.write_bytes(b"\0" * MIB)  # what a power cut can leave: zeros, not the file's bytes
    report = pull_model(config, config.model("tiny"), settings=FAST)
    assert report.ok
    assert bodies(hub)[SHARD1] == [(MIB, 206, len(FILES[SHARD1]) - MIB), (None, 200, 6 * MIB)]
    assert_all_correct(config)


def test_kill_9_in_the_middle_of_a_pull_then_a_rerun_resumes(
    hub: FakeHub, tmp_path: Path
) -> None:
    config_path = write_config(tmp_path)
    config = load_config(config_path)
    hub.inject(SHARD1, slow(2 * MIB))
    part = config.model("tiny").path / f".{SHARD1}.part"
    env = {**os.environ, "SPARKD_CONFIG": str(config_path)}
    child = subprocess.Popen(
        [sys.executable, "-c", "from sparkd.ctl.main import main; main()", "pull", "tiny",
         "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    try:
        deadline = time.monotonic() + 20
        while not (part.exists() and part.stat().st_size >= MIB):
            assert child.poll() is None, child.communicate()
            assert time.monotonic() < deadline, "the pull never got going"
            time.sleep(0.02)
        child.send_signal(signal.SIGKILL)
        out, _err = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.communicate()
    assert child.returncode == -signal.SIGKILL
    assert all(json.loads(line)["event"] for line in out.decode().splitlines())
    on_disk = part.stat().st_size
    assert MIB <= on_disk < len(FILES[SHARD1])
    hub.reset_log()
    report = pull_model(config, config.model("tiny"), settings=FAST)
    assert report.ok
    assert_all_correct(config)
    assert bodies(hub)[SHARD1] == [(on_disk, 206, len(FILES[SHARD1]) - on_disk)]


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_is_a_clear_error_and_keeps_the_partial_files(
    hub: FakeHub, tmp_path: Path, small_disk: Path
) -> None:
    # The disk fills while the pull runs (the up-front free-space check, which would refuse
    # this pull, is off: another writer can always fill the disk after it).
    unchecked = dataclasses.replace(FAST, fetch=dataclasses.replace(FAST.fetch,
                                                                    check_free_space=False))
    config = load_config(write_config(tmp_path, model_dir=small_disk / "tiny"))
    with pytest.raises(DiskFull, match="disk full while writing") as info:
        pull_model(config, config.model("tiny"), settings=unchecked)
    assert "it resumes from the bytes on disk" in info.value.message
    parts = {p: p.stat().st_size for p in (small_disk / "tiny").rglob("*.part")}
    assert parts and sum(parts.values()) > 0, "the partial files are gone"
    with pytest.raises(DiskFull):
        pull_model(config, config.model("tiny"), settings=unchecked)
    assert list((small_disk / "tiny").rglob("*.part")), "partial files were removed"
    # Space freed: the next pull resumes every partial from its bytes on disk.
    kept = {p.name[1:-5]: p.stat().st_size for p in (small_disk / "tiny").rglob("*.part")}
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_disk)], check=True)
    hub.reset_log()
    assert pull_model(config, config.model("tiny"), settings=unchecked).ok
    got = bodies(hub)
    for name, size in kept.items():
        (path,) = [p for p in FILES if p.endswith(name)]
        if size == len(FILES[path]):
            # Every byte was there (a transfer cancelled by the disk-full of another after its
            # last write, before its rename): verified from disk, nothing asked for.
            assert path not in got
            continue
        assert got[path] == [(size or None, 206 if size else 200, len(FILES[path]) - size)]


def test_a_flipped_byte_is_found_by_verify_full_and_repaired_alone(
    hub: FakeHub, tmp_path: Path
) -> None:
    config_path = write_config(tmp_path)
    config = load_config(config_path)
    assert pull_model(config, config.model("tiny"), settings=FAST).ok
    target = config.model("tiny").path / SHARD2
    st = target.stat()
    with target.open("r+b") as f:  # bit rot: same size, same inode, same mtime
        f.seek(MIB + 5)
        byte = f.read(1)
        f.seek(MIB + 5)
        f.write(bytes([byte[0] ^ 0x01]))
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    runner = CliRunner()
    args = ["--config", str(config_path)]
    # Incremental trusts the unchanged stamp: that is what --full is for.
    assert runner.invoke(cli, ["verify", "tiny", *args]).exit_code == 0
    result = runner.invoke(cli, ["verify", "tiny", "--full", "--json", *args])
    assert result.exit_code == ExitStatus.FAILURE
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    final = lines[-1]
    assert final["event"] == "result" and not final["ok"]
    assert [(f["path"], f["status"]) for f in final["failures"]] == [(SHARD2, "BAD")]
    hub.reset_log()
    result = runner.invoke(cli, ["verify", "tiny", "--full", "--repair", *args])
    assert result.exit_code == 0, result.output
    assert list(bodies(hub)) == [SHARD2]
    assert bodies(hub)[SHARD2] == [(None, 200, len(FILES[SHARD2]))]
    assert_all_correct(config)
    assert runner.invoke(cli, ["verify", "tiny", "--full", *args]).exit_code == 0


def test_verify_reports_missing_and_extra_files_and_exits_1(
    hub: FakeHub, tmp_path: Path
) -> None:
    config_path = write_config(tmp_path)
    config = load_config(config_path)
    assert pull_model(config, config.model("tiny"), settings=FAST).ok
    root = config.model("tiny").path
    (root / "tokenizer.json").unlink()
    (root / "stale-00004.safetensors").write_bytes(b"old")
    result = CliRunner().invoke(cli, ["verify", "tiny", "--config", str(config_path)])
    assert result.exit_code == ExitStatus.FAILURE
    assert "MISSING tokenizer.json: not on disk" in result.output
    assert "EXTRA stale-00004.safetensors: not in the manifest" in result.output
    # pull fetches the missing file; the stray one is only warned about (never deleted).
    result = CliRunner().invoke(cli, ["pull", "tiny", "--config", str(config_path)])
    assert result.exit_code == 0, result.output
    assert "warning: EXTRA stale-00004.safetensors" in result.output
    assert (root / "stale-00004.safetensors").exists()
    assert_all_correct(config)


def test_preflight_refuses_a_bad_file_by_name_or_repairs_it(
    hub: FakeHub, tmp_path: Path
) -> None:
    config = load_config(write_config(tmp_path))
    model = config.model("tiny")
    never = preflight_verify(config, model)  # never pulled: nothing to verify against
    assert never.verdicts == () and "sparkctl pull tiny" in never.note
    assert pull_model(config, model, settings=FAST).ok
    (model.path / SHARD3).unlink(missing_ok=True)
    (model.path / "nested" / SHARD3).write_bytes(b"truncated")
    with pytest.raises(VerificationFailed, match=f"nested/{SHARD3}: BAD"):
        preflight_verify(config, model)
    repairing = load_config(write_config(tmp_path, repair=True))
    hub.reset_log()
    report = preflight_verify(repairing, repairing.model("tiny"))
    assert report.ok
    assert list(bodies(hub)) == [f"nested/{SHARD3}"]
    # The daemon's preflight: the same repair, its downloads awaited on the daemon's loop.
    (model.path / "nested" / SHARD3).write_bytes(b"truncated again")
    with pytest.raises(VerificationFailed, match=f"nested/{SHARD3}: BAD"):
        asyncio.run(preflight_verify_async(config, model))
    hub.reset_log()
    assert asyncio.run(preflight_verify_async(repairing, repairing.model("tiny"))).ok
    assert list(bodies(hub)) == [f"nested/{SHARD3}"]


def test_prestart_verifies_before_the_memory_gate(hub: FakeHub, tmp_path: Path) -> None:
    from sparkd.main import cli as sparkd_cli

    config_path = write_config(tmp_path)
    config = load_config(config_path)
    assert pull_model(config, config.model("tiny"), settings=FAST).ok
    runner = CliRunner()
    result = runner.invoke(sparkd_cli, ["prestart", "tiny", "--config", str(config_path)])
    assert result.exit_code == 0, result.output
    assert "prestart tiny: verify: 5 files OK (0 hashed" in result.output
    (config.model("tiny").path / SHARD1).write_bytes(b"x")
    result = runner.invoke(sparkd_cli, ["prestart", "tiny", "--config", str(config_path)])
    assert result.exit_code == 1
    assert f"refused: model tiny: 1 file(s) failed verification: {SHARD1}: BAD" in result.output
    assert "memory gate" not in result.output


def test_unknown_repository_and_revision_are_clear_errors(
    hub: FakeHub, tmp_path: Path
) -> None:
    path = write_config(tmp_path, extra='revision = "no-such-branch"\n')
    result = CliRunner().invoke(cli, ["pull", "tiny", "--config", str(path), "--json"])
    assert result.exit_code == ExitStatus.FAILURE
    error = json.loads(result.stdout.splitlines()[-1])
    assert error["event"] == "error" and error["code"] == "hub"
    assert "no revision 'no-such-branch'" in error["message"]
    result = CliRunner().invoke(cli, ["pull", "nope", "--config", str(path)])
    assert result.exit_code == ExitStatus.UNKNOWN_MODEL


def test_file_patterns_select_what_is_pulled(hub: FakeHub, tmp_path: Path) -> None:
    config = load_config(write_config(tmp_path, extra='files = ["*.json"]\n'))
    report = pull_model(config, config.model("tiny"), settings=FAST)
    assert report.ok
    assert sorted(bodies(hub)) == ["config.json", "tokenizer.json"]


def test_a_huggingface_cache_snapshot_is_verified_offline(
    hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub itself downloads from the fake hub (so the fake answers what it asks),
    then sparkd verifies the cache snapshot with no network: blob names are the hashes."""
    import tqdm
    from huggingface_hub import hf_hub_download

    monkeypatch.setattr(tqdm.tqdm, "monitor_interval", 0)  # no tqdm monitor thread to leak
    cache = tmp_path / "hf-cache"
    for name in FILES:
        got = Path(hf_hub_download(REPO, name, cache_dir=cache, endpoint=hub.endpoint))
        assert got.read_bytes() == FILES[name]
    snapshot = got.parents[1] if "/" in name else got.parent
    assert snapshot.parent.name == "snapshots"
    (tmp_path / "c.toml").write_text(
        f'[daemon]\nstate_dir = "{tmp_path / "state"}"\n'
        f'[models.snap]\nengine = "vllm"\nport = 8302\npath = "{snapshot}"\n'
    )
    config = load_config(tmp_path / "c.toml")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    report = verify_model(config, config.model("snap"))
    assert report.ok and report.count(Status.OK) == len(FILES)
    listed = CliRunner().invoke(cli, ["models", "--json", "--config", str(tmp_path / "c.toml")])
    assert listed.exit_code == 0, listed.output
    snap = json.loads(listed.output)["models"][0]
    assert (snap["files"]["state"], snap["files"]["ok"]) == ("verified", len(FILES))
    assert snap["files"]["stale"] is False and snap["next"] is None
    blob = (snapshot / SHARD2).resolve()
    with blob.open("r+b") as f:
        f.seek(10)
        f.write(b"\xff\xfe")
    listed = CliRunner().invoke(cli, ["models", "--json", "--config", str(tmp_path / "c.toml")])
    snap = json.loads(listed.output)["models"][0]
    assert (snap["files"]["state"], snap["files"]["changed"]) == ("changed", 1)
    assert snap["next"] == "sparkctl verify snap"
    report = verify_model(config, config.model("snap"))
    assert [(v.path, v.status) for v in report.failures] == [(SHARD2, Status.BAD)]


def test_a_server_that_ignores_range_is_read_from_the_start(
    hub: FakeHub, config: Config
) -> None:
    root = config.model("tiny").path
    root.mkdir(parents=True)
    keep = 2 * MIB
    (root / f".{SHARD1}.part").write_bytes(FILES[SHARD1][:keep])
    hub.inject(SHARD1, ignore_range())
    report = pull_model(config, config.model("tiny"), settings=FAST)
    assert report.ok
    assert bodies(hub)[SHARD1] == [(keep, 200, 6 * MIB)]  # asked from 2 MiB, got it all
    assert_all_correct(config)


def test_a_file_that_keeps_failing_is_listed_with_the_reason(
    hub: FakeHub, tmp_path: Path
) -> None:
    config_path = write_config(tmp_path)
    text = config_path.read_text().replace("[daemon]\n", "[daemon]\ndownload_attempts = 2\n")
    config_path.write_text(text)
    hub.inject(f"nested/{SHARD3}", status(503), status(503))
    result = CliRunner().invoke(cli, ["pull", "tiny", "--config", str(config_path)])
    assert result.exit_code == ExitStatus.FAILURE
    assert f"MISSING nested/{SHARD3}: gave up after 2 tries: HTTP 503" in result.output
    config = load_config(config_path)
    # Everything else arrived; a rerun fetches the one file left.
    hub.reset_log()
    assert pull_model(config, config.model("tiny"), settings=FAST).ok
    assert list(bodies(hub)) == [f"nested/{SHARD3}"]


def test_unknown_repository_and_missing_manifest(hub: FakeHub, tmp_path: Path) -> None:
    path = write_config(tmp_path)
    path.write_text(path.read_text().replace(f"hf://{REPO}", "hf://acme/nothing-here"))
    result = CliRunner().invoke(cli, ["pull", "tiny", "--config", str(path)])
    assert result.exit_code == ExitStatus.FAILURE
    assert "hf://acme/nothing-here: no such repository at http://127.0.0.1:" in result.output
    result = CliRunner().invoke(cli, ["verify", "tiny", "--config", str(path)])
    assert result.exit_code == ExitStatus.FAILURE
    assert "no manifest for tiny" in result.output and "sparkctl pull tiny" in result.output


def test_a_file_that_never_hashes_right_gives_up_after_three_whole_fetches(
    hub: FakeHub, config: Config
) -> None:
    hub.inject("tokenizer.json", corrupt(), corrupt(), corrupt())
    report = pull_model(config, config.model("tiny"), settings=FAST)
    assert [(v.path, v.status) for v in report.failures] == [("tokenizer.json", Status.MISSING)]
    assert "after 3 whole-file fetches" in report.failures[0].reason
    assert [s for s, _, _ in bodies(hub)["tokenizer.json"]] == [None, None, None]
    root = config.model("tiny").path
    assert not (root / ".tokenizer.json.part").exists()  # known-wrong bytes are not kept
    assert (root / SHARD1).read_bytes() == FILES[SHARD1]


def test_sparkctl_models_shows_each_models_files_without_a_daemon(
    hub: FakeHub, tmp_path: Path
) -> None:
    config_path = write_config(
        tmp_path, extra='\n[models.ext]\nengine = "external"\nurl = "http://127.0.0.1:1"\n')
    # No daemon listens on this socket: the files' state comes all the same.
    config_path.write_text(config_path.read_text().replace(
        "[daemon]\n", f'[daemon]\ncontrol_socket = "{tmp_path / "none.sock"}"\n'))
    args = ["models", "--json", "--config", str(config_path)]

    def listing() -> dict[str, Any]:
        result = CliRunner().invoke(cli, args)
        assert result.exit_code == 0, result.output
        return {m["name"]: m for m in json.loads(result.output)["models"]} | {
            "_daemon": json.loads(result.output)["daemon"]}

    before = listing()
    assert before["tiny"]["files"]["state"] == "unknown"
    assert "sparkctl pull tiny" in before["tiny"]["files"]["note"]
    assert before["ext"]["files"]["state"] == "external"
    assert before["_daemon"]["reachable"] is False and before["_daemon"]["error"]
    config = load_config(config_path)
    assert pull_model(config, config.model("tiny"), settings=FAST).ok
    after = listing()["tiny"]["files"]
    assert (after["state"], after["ok"], after["files"]) == ("verified", len(FILES), len(FILES))
    assert after["present_bytes"] == after["expected_bytes"] == TOTAL
    root = config.model("tiny").path
    (root / SHARD2).write_bytes((root / SHARD2).read_bytes())  # same bytes, a new stamp
    (root / "tokenizer.json").unlink()
    changed = listing()["tiny"]["files"]
    assert (changed["state"], changed["changed"], changed["missing"]) == ("incomplete", 1, 1)
    human = CliRunner().invoke(cli, ["models", "--config", str(config_path)],
                               env={"COLUMNS": "160"})
    assert human.exit_code == 0, human.output
    assert "incomplete" in human.output and "sparkctl pull tiny" in human.output
    assert "did not answer" in human.output
    # The config now asks for another revision: the files may be right, for the old one.
    config_path.write_text(config_path.read_text().replace(
        'source = "hf://acme/tiny-llm"\n', 'source = "hf://acme/tiny-llm"\nrevision = "v2"\n'))
    stale = listing()["tiny"]
    assert stale["files"]["stale"] is True and stale["next"] == "sparkctl pull tiny"
    assert "the config asks for hf://acme/tiny-llm at v2" in stale["files"]["note"]
    # A look, not a repair: a corrupt manifest is reported and left where it is.
    manifest_file = ManifestStore(config.daemon.state_dir).path("tiny")
    manifest_file.write_text("{ torn")
    torn = listing()["tiny"]["files"]
    assert torn["state"] == "unknown" and "unusable" in torn["note"]
    assert manifest_file.read_text() == "{ torn"
    assert [p.name for p in manifest_file.parent.iterdir()] == ["tiny.json"]


def test_sparkctl_models_lists_the_others_when_one_directory_cannot_be_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import sparkd.store.verify

    config_path = write_config(tmp_path)
    config = load_config(config_path)
    from sparkd.store.manifest import FileEntry, make_manifest

    ManifestStore(config.daemon.state_dir).save(make_manifest(
        model="tiny", source=f"hf://{REPO}", requested_revision="main", revision="c" * 40,
        files=[FileEntry("a.bin", 1, "sha256", "a" * 64)]))
    config.model("tiny").path.mkdir(parents=True)

    def unreadable(root: Path) -> Any:
        raise PermissionError(13, "Permission denied", str(root))

    # As root no mode makes a directory unreadable: the scan's own error stands in for it.
    monkeypatch.setattr(sparkd.store.verify, "scan_model_dir", unreadable)
    result = CliRunner().invoke(cli, ["models", "--json", "--config", str(config_path)])
    assert result.exit_code == 0, result.output
    files = json.loads(result.output)["models"][0]["files"]
    assert files["state"] == "unknown" and "Permission denied" in files["note"]


def test_a_disk_error_is_not_taken_for_a_stall(
    hub: FakeHub, config: Config, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ETIMEDOUT from a write (a soft-mounted NFS) ends that file for this run with the
    reason; it is not retried as a stalled transfer. The next pull resumes it."""
    import errno as errno_

    real_pwrite = os.pwrite
    calls = {"n": 0}

    def flaky_pwrite(fd: int, data: Any, offset: int) -> int:
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(errno_.ETIMEDOUT, os.strerror(errno_.ETIMEDOUT))
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", flaky_pwrite)
    report = pull_model(config, config.model("tiny"), settings=dataclasses.replace(
        FAST, fetch=dataclasses.replace(FAST.fetch, concurrency=1)))
    assert not report.ok
    (failure,) = report.failures
    assert "cannot write" in failure.reason and "timed out" in failure.reason
    assert len(bodies(hub)[failure.path]) == 1  # asked once, not retried as a stall
    monkeypatch.setattr(os, "pwrite", real_pwrite)
    assert pull_model(config, config.model("tiny"), settings=FAST).ok
    assert_all_correct(config)


# Issue 10: a root pull never writes through a link, checks free space first, and drops a
# transfer that trickles.


def test_a_planted_partial_symlink_is_refused_and_its_target_untouched(
    hub: FakeHub, config: Config, tmp_path: Path
) -> None:
    root = config.model("tiny").path
    root.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"root's precious file\n")
    (root / ".config.json.part").symlink_to(victim)
    report = pull_model(config, config.model("tiny"), settings=FAST)
    assert victim.read_bytes() == b"root's precious file\n"
    assert not report.ok
    (failure,) = report.failures
    assert failure.path == "config.json" and failure.status is Status.MISSING
    assert failure.reason.startswith(f"{root / '.config.json.part'}: expected a partial "
                                     "download, found a symbolic link")
    assert (root / ".config.json.part").is_symlink()
    for name in FILES:  # every other file was fetched
        if name != "config.json":
            assert (root / name).read_bytes() == FILES[name]


def test_a_planted_directory_symlink_is_refused_and_nothing_lands_outside(
    hub: FakeHub, config: Config, tmp_path: Path
) -> None:
    root = config.model("tiny").path
    root.mkdir(parents=True)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (root / "nested").symlink_to(elsewhere)
    report = pull_model(config, config.model("tiny"), settings=FAST)
    assert list(elsewhere.iterdir()) == []
    (failure,) = report.failures
    assert failure.path == f"nested/{SHARD3}"
    assert failure.reason.startswith(f"{root / 'nested'}: expected a directory, found a "
                                     "symbolic link")


def test_a_file_that_is_a_symlink_is_refused_with_its_path(
    hub: FakeHub, config: Config, tmp_path: Path
) -> None:
    root = config.model("tiny").path
    root.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"x")
    (root / "tokenizer.json").symlink_to(victim)
    report = pull_model(config, config.model("tiny"), settings=FAST)
    assert victim.read_bytes() == b"x"
    (failure,) = report.failures
    assert failure.reason.startswith(f"{root / 'tokenizer.json'}: expected a file, found a "
                                     "symbolic link")


def test_a_model_directory_that_is_a_symlink_is_refused(
    hub: FakeHub, tmp_path: Path
) -> None:
    real = tmp_path / "real"
    real.mkdir()
    link = tmp_path / "models" / "tiny"
    link.parent.mkdir()
    link.symlink_to(real)
    config = load_config(write_config(tmp_path, model_dir=link))
    with pytest.raises(UnsafePath, match="expected the model directory, found a symbolic link"):
        pull_model(config, config.model("tiny"), settings=FAST)
    assert list(real.iterdir()) == []


def test_a_hard_linked_partial_is_refused(hub: FakeHub, config: Config, tmp_path: Path) -> None:
    root = config.model("tiny").path
    root.mkdir(parents=True)
    victim = tmp_path / "victim"
    victim.write_bytes(b"x")
    os.link(victim, root / ".config.json.part")
    report = pull_model(config, config.model("tiny"), settings=FAST)
    assert victim.read_bytes() == b"x"
    (failure,) = report.failures
    assert "the partial download has 2 hard links" in failure.reason


def test_not_enough_free_space_is_refused_before_the_first_byte(
    hub: FakeHub, tmp_path: Path, small_disk: Path
) -> None:
    config_path = write_config(tmp_path, model_dir=small_disk / "tiny")
    result = CliRunner().invoke(cli, ["pull", "tiny", "--config", str(config_path)])
    assert result.exit_code == ExitStatus.FAILURE, result.output
    expected = f"not enough free space for tiny in {small_disk / 'tiny'}: 14.0 MiB to fetch"
    assert "".join(expected.split()) in "".join(result.output.split())  # lines wrapped
    assert not hub.body_requests(), "bytes were fetched although they could not fit"
    assert not list((small_disk / "tiny").rglob("*.part"))


def test_a_trickling_server_is_dropped_below_the_minimum_rate(
    hub: FakeHub, config: Config
) -> None:
    hub.inject("tokenizer.json", slow(400), slow(400))
    settings = dataclasses.replace(FAST, fetch=dataclasses.replace(
        FAST.fetch, stall_timeout_s=1.0, min_rate_bytes_per_s=4096,
        policy=RetryPolicy(attempts=2, base_s=0.01, cap_s=0.05)))
    started = time.monotonic()
    report = pull_model(config, config.model("tiny"), settings=settings)
    assert time.monotonic() - started < 15  # 50 KiB at 400 bytes/s would take 128 s
    (failure,) = report.failures
    assert failure.path == "tokenizer.json"
    assert "gave up after 2 tries: too slow:" in failure.reason
    assert "below the minimum of 4096 bytes/s" in failure.reason
