"""`sparkd prestart NAME`: make room for an engine, then refuse to start it if there is none.

Runs as `ExecStartPre=+sparkd prestart NAME` of `sparkd-engine@NAME.service` (as root, so the
drop normally works), which means stderr is the journal: every step writes one line saying what
it did, what it freed and how long it took, e.g.

    prestart qwen: drop_caches: freed 88.1 GiB of page cache in 850 ms

Steps (Disaster 1: the previous run's weights stayed in the page cache, and on GB10 CUDA counts
page cache as used):

1. sync, so dirty pages become droppable;
2. drop the page cache (`3` into /proc/sys/vm/drop_caches); where that is not permitted (not
   root, read-only /proc/sys in a container), `posix_fadvise(DONTNEED)` on every regular file
   under the model's path instead: the root-free way to evict one checkpoint.
   A warm swap (sparkd.engine.warm; `--cold` turns it off) first asks how much of the model's
   files is cached (cachestat(2), sparkd.engine.pagecache). When some is, it evicts only the
   other configured models' files (`evict:`), settles, and keeps the model's pages when
   MemAvailable less them still covers memory_gib + the reserve (`warm: kept ...`); otherwise
   (`warm: not kept ...`) it drops everything as above. The gate counts kept pages as used;
3. wait until MemAvailable stops rising (an engine that just exited is still giving memory back),
   bounded by `daemon.settle_timeout_s`; a timeout is reported and the gate decides. Skipped
   when no sparkd engine stopped (or died) within the last
   `settle_timeout_s` (the first start of a boot, after a power cut say): nothing is giving
   memory back then, and the wait was ~0.45 s of nothing (`settle_needed`). Engine units touch
   ENGINE_STOPPED_STAMP in ExecStopPost; systemd itself cannot say (it unloads a unit that
   stopped cleanly, and its timestamps with it);
4. the memory gate: refuse (exit 1) when memory_gib + daemon.memory_reserve_gib is more than
   MemAvailable.

Before these steps, a model with a manifest (sparkd.store, issue 4) is verified
incrementally (`preflight_verify`): a BAD or MISSING file refuses the start, naming it, unless
the model says `repair = true`.

Exit status: 0 started may go ahead, 1 refused or failed, 2 configuration error or unknown model.

Plan, then apply: `plan_prestart(config, name)` and `memory_gate(plan, meminfo)` are pure;
`run_prestart(plan, system, emit)` performs the steps through `PrestartSystem`, a Protocol whose
one real implementation is `RealSystem`; `command` wires the real ones.
"""

from __future__ import annotations

import enum
import os
import stat
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Final, Literal, Protocol

import click

from sparkd.config import Config, Variant, load_config
from sparkd.engine.pagecache import PageCache, evict
from sparkd.engine.unit import ENGINE_STOPPED_STAMP
from sparkd.engine.warm import ModelFile, decide_keep, plan_eviction
from sparkd.errors import ConfigError, PrestartRefused, UnknownModel
from sparkd.monitor.memory import (
    GIB,
    MEMINFO_PATH,
    MemInfo,
    MemInfoError,
    SettleRule,
    SettleState,
    SettleTracker,
    format_size,
    gib,
    read_meminfo,
)
from sparkd.options import config_option

DROP_CACHES_PATH: Final = Path("/proc/sys/vm/drop_caches")
SETTLE_INTERVAL_S: Final = 0.15

Emit = Callable[[str], None]


class ExitStatus(enum.IntEnum):
    OK = 0
    REFUSED = 1  # the memory gate said no, or a step failed (meminfo unreadable)
    CONFIG = 2  # invalid configuration or unknown model


class PrestartSystem(Protocol):
    """The outside world prestart touches, one narrow method per effect."""

    def sync(self) -> None: ...

    def drop_caches(self) -> None:
        """Drop the whole page cache. Raises OSError where that is not permitted."""
        ...

    def regular_files(self, root: Path) -> list[tuple[Path, int]]:
        """(path, size) of every regular file under root. Raises FileNotFoundError when root
        does not exist."""
        ...

    def fadvise_dontneed(self, path: Path) -> None:
        """Evict one file's clean pages from the page cache. Raises OSError."""
        ...

    def model_files(self, root: Path) -> list[ModelFile]:
        """regular_files with each file's identity (device, inode); [] when root does not
        exist."""
        ...

    def cached_bytes(self, path: Path) -> int:
        """Bytes of one file in the page cache. Raises OSError."""
        ...

    def read_meminfo(self) -> MemInfo: ...

    def sleep(self, seconds: float) -> None: ...

    def monotonic(self) -> float: ...


# --- plan (pure) ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class PrestartPlan:
    model: str
    model_path: Path
    memory_gib: float
    reserve_gib: float
    settle: SettleRule
    interval_s: float = SETTLE_INTERVAL_S
    # Why settling can be skipped (no engine stopped lately); None: settle.
    settle_skip: str | None = None
    # Warm swaps (sparkd.engine.warm): keep the target's cached pages where memory allows,
    # evicting the other models' files. False: the blanket drop, always (`--cold`).
    warm: bool = True
    # The other models in the config: (name, path), each path once, none the target's.
    others: tuple[tuple[str, Path], ...] = ()

    @property
    def need_bytes(self) -> int:
        return round((self.memory_gib + self.reserve_gib) * GIB)

    @property
    def prefix(self) -> str:
        return f"prestart {self.model}"


def plan_prestart(config: Config, name: str, variant: Variant = "plain") -> PrestartPlan:
    """What prestart will do for model `name` (its `variant`). Raises UnknownModel."""
    model = config.model(name)
    others: dict[Path, str] = {}
    for other in config.models.values():
        if other.path != model.path and other.path not in others:
            others[other.path] = other.name
    return PrestartPlan(
        model=model.name,
        model_path=model.path,
        memory_gib=model.memory_gib_for(variant),
        reserve_gib=config.daemon.memory_reserve_gib,
        settle=SettleRule(timeout_s=config.daemon.settle_timeout_s),
        others=tuple((other, path) for path, other in others.items()),
    )


@dataclass(frozen=True, slots=True)
class GateVerdict:
    admitted: bool
    line: str  # the log line (admitted) or the refusal message, prefixed with "prestart NAME: "


def memory_gate(plan: PrestartPlan, mem: MemInfo, *, kept: int = 0) -> GateVerdict:
    """Admit when memory_gib + reserve fits in MemAvailable (swap never counts). `kept`:
    bytes of the target's files left in the page cache (a warm swap), counted as used: on
    unified memory the cached copy and the loaded copy both occupy it."""
    available = mem.available - kept
    needs = (
        f"needs {plan.memory_gib:.1f} GiB + {plan.reserve_gib:.1f} GiB reserve, "
        f"{gib(available)} GiB available"
    )
    if kept:
        needs += (f" (MemAvailable {gib(mem.available)} GiB less {format_size(kept)} of "
                  f"{plan.model}'s files kept in the page cache)")
    if plan.need_bytes > available:
        return GateVerdict(
            admitted=False,
            line=f"{plan.prefix}: refused: {needs} (stop other GPU work or lower memory_gib)",
        )
    line = f"{plan.prefix}: memory gate: ok: {needs} ({gib(mem.free)} GiB free)"
    if plan.need_bytes > mem.free:
        # Only after a partial drop (the fadvise fallback): MemAvailable counts the page cache
        # that is left, cudaMemGetInfo on GB10 does not.
        line += (
            f"; warning: only {gib(mem.free)} GiB is free, the rest is page cache that CUDA on "
            "GB10 counts as used"
        )
    return GateVerdict(admitted=True, line=line)


# --- apply ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class DropResult:
    # drop_caches / fadvise: the whole page cache (fadvise: the target's files, where the drop
    # is not permitted); evict: the other models' files only (a warm swap).
    method: Literal["drop_caches", "fadvise", "evict"]
    freed: int  # bytes of page cache, before minus after (0 when it grew)
    files: int = 0  # fadvise and evict: files advised
    failed: int = 0  # fadvise and evict: files that could not be opened or advised


@dataclass(frozen=True, slots=True)
class PrestartReport:
    drop: DropResult  # the last drop: the blanket one, or the eviction when the target stayed
    settle: SettleState | None  # None: settling skipped (settle_timeout_s = 0)
    meminfo: MemInfo  # the reading the gate decided on
    lines: tuple[str, ...] = ()
    evicted: DropResult | None = None  # the other models' files, when the target was cached
    kept: int = 0  # bytes of the target's files left in the page cache, counted as used


def run_prestart(plan: PrestartPlan, system: PrestartSystem, emit: Emit) -> PrestartReport:
    """Run the steps, emitting one line each. Raises PrestartRefused when the gate says no,
    OSError / MemInfoError when /proc/meminfo cannot be read."""
    lines: list[str] = []

    def log(text: str) -> None:
        line = f"{plan.prefix}: {text}"
        lines.append(line)
        emit(line)

    def since(start: float) -> str:
        return f"{(system.monotonic() - start) * 1000:.0f} ms"

    before_sync = system.read_meminfo()
    start = system.monotonic()
    system.sync()
    took = since(start)
    after_sync = system.read_meminfo()
    log(
        f"sync: flushed dirty pages ({format_size(before_sync.dirty)} before, "
        f"{format_size(after_sync.dirty)} after) in {took}"
    )

    target: list[ModelFile] = []
    if plan.warm:
        target = system.model_files(plan.model_path)
        cached = _cached(system, target)
        size = format_size(sum(f.size for f in target))
        if cached > 0:
            log(f"page cache: {format_size(cached)} of {plan.model}'s {size} of files cached: "
                f"evicting the other models' files, keeping {plan.model}'s where memory allows")
        else:
            log(f"page cache: none of {plan.model}'s {size} of files cached: "
                "dropping the whole page cache")
            target = []
    if not target:
        drop, after_drop = _drop_all(plan, system, after_sync, log, since)
        settle_state, mem = _settle(plan, system, after_drop, log)
        return _gate(plan, mem, emit, lines, drop=drop, settle=settle_state)

    evicted, after_evict = _evict_others(plan, system, target, after_sync, log, since)
    settle_state, mem = _settle(plan, system, after_evict, log)
    keep = decide_keep(
        model=plan.model, target_cached=_cached(system, target), available=mem.available,
        need=plan.need_bytes, memory_gib=plan.memory_gib, reserve_gib=plan.reserve_gib,
    )
    log(keep.line)
    if keep.keep:
        return _gate(plan, mem, emit, lines, drop=evicted, settle=settle_state,
                     evicted=evicted, kept=keep.target_cached)
    drop, after_drop = _drop_all(plan, system, mem, log, since)
    return _gate(plan, after_drop, emit, lines, drop=drop, settle=settle_state,
                 evicted=evicted)


def _gate(
    plan: PrestartPlan, mem: MemInfo, emit: Emit, lines: list[str], *, drop: DropResult,
    settle: SettleState | None, evicted: DropResult | None = None, kept: int = 0,
) -> PrestartReport:
    verdict = memory_gate(plan, mem, kept=kept)
    if not verdict.admitted:
        raise PrestartRefused(verdict.line)
    lines.append(verdict.line)
    emit(verdict.line)
    return PrestartReport(drop=drop, settle=settle, meminfo=mem, lines=tuple(lines),
                          evicted=evicted, kept=kept)


def _cached(system: PrestartSystem, files: list[ModelFile]) -> int:
    """Bytes of `files` in the page cache; a file that cannot be asked counts as none (the
    engine's load will say what is wrong with it)."""
    total = 0
    for f in files:
        try:
            total += system.cached_bytes(f.path)
        except OSError:
            continue
    return total


def _drop_all(
    plan: PrestartPlan, system: PrestartSystem, before: MemInfo, log: Emit,
    since: Callable[[float], str],
) -> tuple[DropResult, MemInfo]:
    """The blanket drop: the whole page cache, or where that is not permitted the target's
    files (the other models' were evicted first on a warm attempt)."""
    start = system.monotonic()
    method: Literal["drop_caches", "fadvise"] = "drop_caches"
    advised, failed, how = 0, 0, ""
    try:
        system.drop_caches()
    except OSError as exc:
        method = "fadvise"
        advised, failed, how = _fadvise_fallback(plan, system, exc)
    took = since(start)
    after_drop = system.read_meminfo()
    freed = max(0, before.page_cache - after_drop.page_cache)
    drop = DropResult(method, freed, advised, failed)
    log(
        f"drop_caches: {how}freed {format_size(drop.freed)} of page cache in {took} "
        f"({gib(after_drop.free)} GiB free, {format_size(after_drop.page_cache)} cached)"
    )
    return drop, after_drop


def _evict_others(
    plan: PrestartPlan, system: PrestartSystem, target: list[ModelFile], before: MemInfo,
    log: Emit, since: Callable[[float], str],
) -> tuple[DropResult, MemInfo]:
    """posix_fadvise(DONTNEED) on every other model's files (none the target shares)."""
    start = system.monotonic()
    eviction = plan_eviction(
        target, [(name, system.model_files(path)) for name, path in plan.others])
    failures: list[tuple[Path, OSError]] = []
    for f in eviction.files:
        try:
            system.fadvise_dontneed(f.path)
        except OSError as err:
            failures.append((f.path, err))
    took = since(start)
    after = system.read_meminfo()
    advised = len(eviction.files) - len(failures)
    result = DropResult("evict", max(0, before.page_cache - after.page_cache), advised,
                        len(failures))
    models = ", ".join(eviction.models) if eviction.models else "none"
    how = (f"posix_fadvise(DONTNEED) on {advised} file{'' if advised == 1 else 's'} "
           f"({format_size(eviction.size)}) of the other models ({models})")
    if eviction.shared:
        how += f", {eviction.shared} shared with {plan.model} kept"
    if failures:
        first_path, first_err = failures[0]
        how += (f", {len(failures)} could not be advised (first: {first_path}: "
                f"{type(first_err).__name__}: {first_err.strerror or first_err})")
    log(f"evict: {how}: freed {format_size(result.freed)} of page cache in {took} "
        f"({gib(after.free)} GiB free, {format_size(after.page_cache)} cached)")
    return result, after


def _fadvise_fallback(
    plan: PrestartPlan, system: PrestartSystem, exc: OSError
) -> tuple[int, int, str]:
    """Evict only this model's files: (files advised, files failed, the log line's why/how)."""
    why = f"{DROP_CACHES_PATH} not writable ({type(exc).__name__}: {exc.strerror or exc})"
    try:
        files = system.regular_files(plan.model_path)
    except FileNotFoundError:
        return (
            0,
            0,
            f"{why}; fell back to posix_fadvise(DONTNEED), but the model path "
            f"{plan.model_path} does not exist, nothing advised: ",
        )
    failures: list[tuple[Path, OSError]] = []
    size = 0
    for path, nbytes in files:
        try:
            system.fadvise_dontneed(path)
        except OSError as err:
            failures.append((path, err))
        else:
            size += nbytes
    advised = len(files) - len(failures)
    how = (
        f"{why}; fell back to posix_fadvise(DONTNEED) on {advised} "
        f"file{'' if advised == 1 else 's'} ({format_size(size)}) under {plan.model_path} "
        "(other page cache stays)"
    )
    if failures:
        first_path, first_err = failures[0]
        how += (
            f", {len(failures)} could not be advised (first: {first_path}: "
            f"{type(first_err).__name__}: {first_err.strerror or first_err})"
        )
    return advised, len(failures), how + ": "


def _settle(
    plan: PrestartPlan, system: PrestartSystem, first: MemInfo, log: Emit
) -> tuple[SettleState | None, MemInfo]:
    if plan.settle.timeout_s <= 0:
        log("settle: skipped (daemon.settle_timeout_s = 0)")
        return None, first
    if plan.settle_skip is not None:
        log(f"settle: skipped ({plan.settle_skip})")
        return None, first
    tracker = SettleTracker(total=first.total, rule=plan.settle)
    mem = first
    verdict = tracker.add(system.monotonic(), mem.available)
    while verdict.state is SettleState.SETTLING:
        # The last sample lands on the deadline, not up to one interval past it.
        system.sleep(min(plan.interval_s, plan.settle.timeout_s - verdict.waited_s))
        mem = system.read_meminfo()
        verdict = tracker.add(system.monotonic(), mem.available)
    waited = f"{verdict.waited_s * 1000:.0f} ms"
    if verdict.state is SettleState.SETTLED:
        log(
            f"settle: MemAvailable settled at {gib(verdict.available)} GiB in {waited} "
            f"({_signed(verdict.total_rise)} while waiting)"
        )
    else:
        log(
            f"settle: MemAvailable still rising after {verdict.waited_s:.1f} s "
            f"(+{format_size(verdict.rise)} over the last {plan.settle.window} samples, "
            f"settled means less than {format_size(verdict.threshold)}); "
            "going on to the memory gate"
        )
    return verdict.state, mem


def settle_needed(stopped_at: float | None, *, now: float, timeout_s: float) -> str | None:
    """Why prestart must wait for memory to settle, or None when it may skip the wait: no
    sparkd engine stopped (or died: ExecStopPost runs after a crash too) within the last
    `timeout_s`. `stopped_at` is the stamp's time (None: no engine stopped since boot)."""
    if stopped_at is None:
        return None
    ago = now - stopped_at
    if ago < timeout_s:
        # A negative age (the clock stepped back) settles too.
        return f"an engine stopped {max(ago, 0.0):.1f} s ago"
    return None


def read_stopped_stamp(path: Path = Path(ENGINE_STOPPED_STAMP)) -> float | None:
    """When an engine last stopped (the stamp's mtime), None when none did since boot; an
    unreadable stamp counts as just now (settle)."""
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None
    except OSError:
        return time.time()


def _signed(n: int) -> str:
    return format_size(n) if n < 0 else "+" + format_size(n)


# --- the real system --------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RealSystem:
    drop_caches_path: Path = DROP_CACHES_PATH
    meminfo_path: Path = MEMINFO_PATH
    page_cache: PageCache = field(default_factory=PageCache)

    def sync(self) -> None:
        os.sync()

    def drop_caches(self) -> None:
        # "3": page cache plus reclaimable slab (dentries, inodes), as NVIDIA's playbooks say.
        with self.drop_caches_path.open("w", encoding="ascii") as f:
            f.write("3\n")

    def regular_files(self, root: Path) -> list[tuple[Path, int]]:
        """Symlinks to files are followed (a Hugging Face snapshot is all symlinks into
        blobs/); symlinks to directories are not (no loops). Each file once, by inode."""
        if not root.exists():
            raise FileNotFoundError(root)
        return [(f.path, f.size) for f in self.model_files(root)]

    def model_files(self, root: Path) -> list[ModelFile]:
        found: list[ModelFile] = []
        seen: set[tuple[int, int]] = set()
        for dirpath, _dirs, names in os.walk(root):
            for name in names:
                path = Path(dirpath, name)
                try:
                    st = path.stat()
                except OSError:
                    continue  # a dangling symlink, or gone since the walk listed it
                if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    found.append(ModelFile(path, st.st_size, (st.st_dev, st.st_ino)))
        try:
            st = root.stat()
        except OSError:
            return found
        if stat.S_ISREG(st.st_mode):
            found.append(ModelFile(root, st.st_size, (st.st_dev, st.st_ino)))
        return found

    def fadvise_dontneed(self, path: Path) -> None:
        evict(path)

    def cached_bytes(self, path: Path) -> int:
        return self.page_cache.cached_bytes(path)

    def read_meminfo(self) -> MemInfo:
        return read_meminfo(self.meminfo_path)

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)

    def monotonic(self) -> float:
        return time.monotonic()


def _stderr(line: str) -> None:
    click.echo(line, err=True)


def prepare_sim_dir(path: Path, user: str) -> str:
    """The simulated engine writes its synthetic weights itself, as the unprivileged engine
    user under ProtectSystem=strict: make sure its directory exists and is the user's."""
    import pwd

    if path.is_dir():
        return f"sim weights directory {path} exists"
    path.mkdir(parents=True, exist_ok=True)
    try:
        entry = pwd.getpwnam(user)
    except KeyError:
        return f"created sim weights directory {path} (no user {user!r} to give it to)"
    os.chown(path, entry.pw_uid, entry.pw_gid)
    return f"created sim weights directory {path} for {user}"


@click.command("prestart")
@config_option
@click.argument("name")
@click.option("--variant", type=click.Choice(["plain", "speculative"]), default="plain",
              show_default=True, help="Which engine variant of the model starts.")
@click.option("--stopped-stamp", type=click.Path(path_type=Path), hidden=True,
              default=Path(ENGINE_STOPPED_STAMP),
              help="The file engine units touch when they stop (for tests).")
@click.option("--cold", is_flag=True,
              help="Drop the whole page cache even when NAME's cached files could stay.")
def command(config_file: Path, name: str, variant: Variant, stopped_stamp: Path, *,
            cold: bool) -> None:
    """Sync, drop the page cache (all of it, or the other models' files only when NAME's
    cached files fit beside it), wait for memory to settle, and refuse to start model NAME
    when its memory_gib plus the reserve is not available. Runs as the engine unit's
    ExecStartPre; exit 1 refuses the start."""
    try:
        config = load_config(config_file)
        plan = replace(plan_prestart(config, name, variant), warm=not cold)
    except (ConfigError, UnknownModel) as exc:
        _stderr(exc.message)
        sys.exit(ExitStatus.CONFIG)
    model = config.models[name]
    if model.engine == "sim":
        _stderr(f"{plan.prefix}: {prepare_sim_dir(model.path, config.daemon.engine_user)}")
    # Before the drop: what verification reads lands in the page cache, and the drop then
    # gives it back before the memory gate measures (issue 4, sparkd.store.preflight).
    from sparkd.store.preflight import prestart_verify

    if not prestart_verify(config, name, _stderr):
        sys.exit(ExitStatus.REFUSED)
    if plan.settle.timeout_s > 0 and settle_needed(
        read_stopped_stamp(stopped_stamp), now=time.time(), timeout_s=plan.settle.timeout_s
    ) is None:
        plan = replace(plan, settle_skip=f"no sparkd engine stopped in the last "
                       f"{plan.settle.timeout_s:g} s: nothing is giving memory back")
    try:
        run_prestart(plan, RealSystem(), _stderr)
    except PrestartRefused as exc:
        _stderr(exc.message)
        sys.exit(ExitStatus.REFUSED)
    except (OSError, MemInfoError) as exc:
        _stderr(f"{plan.prefix}: failed: cannot read memory: {exc}")
        sys.exit(ExitStatus.REFUSED)
