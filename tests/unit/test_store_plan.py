"""The store's pure core: manifests, verification and fetch planning, retries, progress."""

from __future__ import annotations

import datetime as dt
import hashlib
import io
import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sparkd.errors import ManifestError
from sparkd.store.manifest import (
    FileEntry,
    Manifest,
    ManifestStore,
    Stamp,
    carry_stamps,
    check_relpath,
    make_manifest,
    parse_manifest,
    render_manifest,
)
from sparkd.store.plan import (
    FetchJob,
    FileVerdict,
    LocalView,
    ProgressBook,
    RateFloor,
    RetryPolicy,
    Status,
    VerifyReport,
    bytes_to_fetch,
    judge,
    merge_verdicts,
    plan_fetch,
    plan_verify,
)
from sparkd.store.progress import JsonLinesReporter

SHA = "a" * 64


def entry(path: str, size: int = 10, *, digest: str = SHA, stamp: Stamp | None = None) -> FileEntry:
    return FileEntry(path=path, size=size, algorithm="sha256", digest=digest, verified=stamp)


def manifest(*files: FileEntry) -> Manifest:
    return make_manifest(model="m", source="hf://o/r", requested_revision="main",
                         revision="c" * 40, files=files)


# --- manifests --------------------------------------------------------------------------------

names = st.text(alphabet="abcXYZ019_-.", min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..")
)
paths = st.lists(names, min_size=1, max_size=3).map("/".join)
stamps = st.builds(Stamp, st.integers(0, 2**40), st.integers(0, 2**62), st.integers(1, 2**40))
entries = st.builds(
    FileEntry,
    path=paths,
    size=st.integers(0, 2**40),
    algorithm=st.sampled_from(["sha256", "git-sha1"]),
    digest=st.just(""),
    verified=st.none() | stamps,
)


def _fix_digest(e: FileEntry) -> FileEntry:
    digest = ("0123456789abcdef" * 4)[: 64 if e.algorithm == "sha256" else 40]
    return FileEntry(e.path, e.size, e.algorithm, digest, e.verified)


@given(st.lists(entries, max_size=8, unique_by=lambda e: e.path))
def test_manifest_json_round_trips(files: list[FileEntry]) -> None:
    m = manifest(*[_fix_digest(f) for f in files])
    assert parse_manifest(render_manifest(m)) == m


@pytest.mark.parametrize("bad", ["", "/etc/passwd", "../x", "a/../b", "a//b", "./a", "a\0b"])
def test_paths_that_leave_the_model_directory_are_refused(bad: str) -> None:
    with pytest.raises(ValueError, match="unsafe"):
        check_relpath(bad)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("{", "not valid JSON"),
        ('{"schema": 2}', "schema 2 is not 1"),
        ('{"schema": 1, "model": "m", "files": [{"path": "../x", "size": 1, '
         '"algorithm": "sha256", "digest": "' + SHA + '"}]}', "unsafe file path"),
        ('{"schema": 1, "model": "m", "files": [{"path": "x", "size": 1, '
         '"algorithm": "sha256", "digest": "abc"}]}', "not a sha256 hex digest"),
        ('{"schema": 1, "model": "m", "files": [{"path": "x", "size": true, '
         '"algorithm": "sha256", "digest": "' + SHA + '"}]}', "size: expected int"),
    ],
)
def test_broken_manifests_say_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ManifestError, match=message):
        parse_manifest(text)


def test_a_corrupt_manifest_is_kept_aside_never_deleted(tmp_path: Path) -> None:
    now = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
    store = ManifestStore(tmp_path, now=now)
    store.save(manifest(entry("a")))
    assert store.load("m")[0] == manifest(entry("a"))
    store.path("m").write_text("{ torn")
    loaded, warning = store.load("m")
    assert loaded is None and warning is not None
    aside = tmp_path / "manifests" / "m.json.corrupt-20261201T120000Z"
    assert aside.read_text() == "{ torn" and str(aside) in warning
    store.path("m").write_text("also torn")
    store.load("m")
    assert (tmp_path / "manifests" / "m.json.corrupt-20261201T120000Z.1").exists()


def test_stamps_carry_over_only_for_unchanged_content() -> None:
    s = Stamp(10, 1, 2)
    old = manifest(entry("a", stamp=s), entry("b", stamp=s))
    new = manifest(entry("a"), entry("b", digest="b" * 64), entry("c"))
    carried = carry_stamps(old, new).by_path
    assert carried["a"].verified == s
    assert carried["b"].verified is None and carried["c"].verified is None


# --- verification planning --------------------------------------------------------------------


def test_incremental_plan_hashes_only_changed_or_unstamped_files() -> None:
    s = Stamp(10, 100, 7)
    m = manifest(entry("same", stamp=s), entry("touched", stamp=s), entry("new"),
                 entry("gone", stamp=s), entry("short", stamp=s))
    local = LocalView(stamps={"same": s, "touched": Stamp(10, 101, 7), "new": Stamp(10, 5, 8),
                              "short": Stamp(9, 100, 7), "stray": Stamp(1, 1, 9)})
    plan = plan_verify(m, local, full=False, extra=local.stamps)
    assert sorted(e.path for e in plan.to_hash) == ["new", "touched"]
    settled = {v.path: v.status for v in plan.settled}
    assert settled == {"same": Status.OK, "gone": Status.MISSING, "short": Status.BAD}
    assert plan.extra == ("stray",)
    full = plan_verify(m, local, full=True)
    assert sorted(e.path for e in full.to_hash) == ["new", "same", "touched"]


@given(
    st.lists(st.tuples(names, st.integers(0, 100), st.booleans(), st.sampled_from(
        ["same", "changed", "missing", "resized"])), max_size=12, unique_by=lambda t: t[0]),
    st.booleans(),
)
def test_every_file_is_hashed_or_settled_exactly_once(
    spec: list[tuple[str, int, bool, str]], full: bool  # noqa: FBT001
) -> None:
    files, local = [], {}
    for name, size, stamped, what in spec:
        s = Stamp(size, 1, 1)
        files.append(entry(name, size, stamp=s if stamped else None))
        if what == "same":
            local[name] = s
        elif what == "changed":
            local[name] = Stamp(size, 2, 1)
        elif what == "resized":
            local[name] = Stamp(size + 1, 1, 1)
    plan = plan_verify(manifest(*files), LocalView(local), full=full)
    seen = [e.path for e in plan.to_hash] + [v.path for v in plan.settled]
    assert sorted(seen) == sorted(name for name, *_ in spec)
    for v in plan.settled:
        if v.status is Status.OK:
            assert not full  # --full trusts no stamp
    # Biggest first, so parallel workers finish together.
    assert [e.size for e in plan.to_hash] == sorted((e.size for e in plan.to_hash), reverse=True)


def test_judge_checks_size_then_digest() -> None:
    e = entry("x", 3, digest=hashlib.sha256(b"abc").hexdigest())
    assert judge(e, hashlib.sha256(b"abc").hexdigest(), size=3).status is Status.OK
    assert "size 2 bytes" in judge(e, SHA, size=2).reason
    bad = judge(e, SHA, size=3)
    assert bad.status is Status.BAD and bad.reason.startswith("sha256 aaaaaaaaaaaa...")


def test_fetch_plan_takes_only_bad_and_missing_files_and_resumes_prefixes() -> None:
    m = manifest(entry("ok"), entry("bad"), entry("missing"), entry("long"))
    verdicts = [FileVerdict("ok", Status.OK), FileVerdict("bad", Status.BAD),
                FileVerdict("missing", Status.MISSING), FileVerdict("long", Status.MISSING),
                FileVerdict("extra", Status.EXTRA)]
    jobs = plan_fetch(m, verdicts, LocalView({}, partials={"missing": 4, "long": 11, "ok": 3}))
    assert [(j.path, j.resume_from, j.to_transfer) for j in jobs] == [
        ("bad", 0, 10), ("long", 0, 10), ("missing", 4, 6)]


def test_report_status_and_merge() -> None:
    report = VerifyReport("m", merge_verdicts(
        [FileVerdict("a", Status.BAD), FileVerdict("b", Status.OK)],
        [FileVerdict("a", Status.OK)], [FileVerdict("z", Status.EXTRA)]), None)
    assert [v.path for v in report.verdicts] == ["a", "b", "z"]
    assert not report.ok and report.blocking == ()
    assert report.count(Status.OK) == 2


# --- retries and progress ---------------------------------------------------------------------


@given(st.integers(1, 60))
def test_backoff_grows_and_is_capped(n: int) -> None:
    policy = RetryPolicy(base_s=0.5, factor=2, cap_s=30)
    assert 0.5 <= policy.delay(n) <= 30
    assert policy.delay(n + 1) >= policy.delay(n)


def test_backoff_values_and_attempts() -> None:
    policy = RetryPolicy(attempts=3, base_s=0.5, factor=2, cap_s=3)
    assert [policy.delay(n) for n in (0, 1, 2, 3, 4)] == [0, 0.5, 1, 2, 3]
    assert policy.may_retry(2) and not policy.may_retry(3)


def test_progress_speed_eta_and_resumed_bytes() -> None:
    book = ProgressBook(window_s=10)
    book.add_file("a", 1000, already=400)  # resumed: done, but not counted toward speed
    book.add_file("b", 1000)
    assert book.completed == 400 and book.speed() == 0 and book.eta_s() is None
    book.advance("a", 100, 0.0)
    book.advance("b", 100, 1.0)
    book.advance("b", 200, 2.0)
    assert book.completed == 800
    assert book.speed() == 150  # 300 bytes over the 2 s between the first and last sample
    assert book.eta_s() == pytest.approx(1200 / 150)
    book.restart_file("b", 0)
    assert book.completed == 500


def test_json_lines_reporter_throttles_but_always_tells_the_end() -> None:
    out = io.StringIO()
    now = [0.0]
    r = JsonLinesReporter(out, interval_s=1.0, clock=lambda: now[0])
    r.phase("fetch", [("a", 30, 0)])
    for _ in range(3):
        r.advance("a", 10)
        now[0] += 0.1
    r.file_done(FileVerdict("a", Status.OK, "fetched", hashed=True))
    r.result(VerifyReport("m", (FileVerdict("a", Status.OK),), None))
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    assert [line["event"] for line in lines] == ["phase", "progress", "progress", "file",
                                                  "result"]
    assert lines[0] == {"event": "phase", "phase": "fetch", "files": 1, "bytes": 30}
    assert lines[2]["done"] == 30 and lines[2]["total_done"] == 30
    assert lines[-1]["ok"] is True and lines[-1]["files"]["OK"] == 1


# --- sparkctl models: the files' state without hashing ----------------------------------------


def test_files_state_is_decided_like_an_incremental_verify() -> None:
    from sparkd.store.listing import files_state

    s1, s2 = Stamp(10, 1, 1), Stamp(10, 2, 2)
    m = manifest(entry("a", stamp=s1), entry("b", stamp=s2))
    settled = files_state(m, LocalView(stamps={"a": s1, "b": s2}))
    assert (settled.state, settled.ok, settled.files) == ("verified", 2, 2)
    assert settled.present_bytes == settled.expected_bytes == 20
    assert settled.revision == "c" * 40
    touched = files_state(m, LocalView(stamps={"a": s1, "b": Stamp(10, 3, 2)}))
    assert (touched.state, touched.ok, touched.changed) == ("changed", 1, 1)
    never = files_state(manifest(entry("a")), LocalView(stamps={"a": s1}))
    assert never.state == "changed"  # pulled elsewhere, never verified here
    partial = files_state(m, LocalView(stamps={"a": s1}, partials={"b": 4}))
    assert (partial.state, partial.missing, partial.present_bytes) == ("incomplete", 1, 14)
    # A wrong size outranks a missing file: it is the one to repair first.
    wrong = files_state(m, LocalView(stamps={"a": Stamp(9, 1, 1)}))
    assert (wrong.state, wrong.bad, wrong.missing) == ("bad", 1, 1)
    # A manifest of no files (a cache snapshot not downloaded yet) proves nothing.
    empty = files_state(manifest(), LocalView(stamps={}))
    assert (empty.state, empty.note) == ("unknown", "the manifest lists no files")


def test_a_read_only_look_leaves_a_corrupt_manifest_where_it_is(tmp_path: Path) -> None:
    store = ManifestStore(tmp_path)
    store.path("m").parent.mkdir(parents=True)
    store.path("m").write_text("{ torn")
    loaded, warning = store.load("m", set_aside=False)
    assert loaded is None and warning is not None and "unusable" in warning
    assert store.path("m").read_text() == "{ torn"
    assert [p.name for p in store.path("m").parent.iterdir()] == ["m.json"]


# Issue 10: a minimum transfer rate and the bytes a fetch needs on disk.


def test_rate_floor_trips_only_after_a_whole_slow_window() -> None:
    floor = RateFloor(min_bytes_per_s=1000, window_s=10.0, start=0.0, received=0)
    # A byte every 1.5 s: never a stall, but 7 bytes in 10.5 s.
    for i in range(1, 7):
        assert floor.check(1.5 * i, i) == ""
    reason = floor.check(10.5, 7)
    assert reason == "too slow: 7 bytes in 10.5 s, below the minimum of 1000 bytes/s"


def test_rate_floor_starts_a_new_window_when_the_rate_held() -> None:
    floor = RateFloor(min_bytes_per_s=100, window_s=1.0, start=0.0, received=500)
    assert floor.check(1.0, 700) == ""  # 200 bytes in the first second
    assert floor.check(1.9, 701) == ""  # the second window is not over yet
    assert floor.check(2.0, 750).startswith("too slow: 50 bytes in 1.0 s")
    assert RateFloor(0, 1.0, start=0.0, received=0).check(100.0, 0) == ""  # 0: no floor


def test_bytes_to_fetch_counts_what_is_not_on_disk_yet() -> None:
    a = FileEntry("a", 100, "sha256", "0" * 64)
    b = FileEntry("b", 50, "sha256", "1" * 64)
    assert bytes_to_fetch([FetchJob(a, 30), FetchJob(b, 0)]) == 120
    assert bytes_to_fetch([]) == 0
