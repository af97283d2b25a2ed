"""Project-wide test hygiene: a test that leaks threads, asyncio tasks or child processes
fails (in its teardown), and the leaked child processes are killed so that they do not
take the blame off the next test.

What counts as a leak:
- a thread started during the test that is still alive after a short grace period;
- an asyncio task still pending when its event loop was torn down: `asyncio.run()` cancels
  such tasks silently, which hides a missing `await` or a background task nobody stops;
- a child process (at any depth) started during the test and still there after a grace
  period, zombies included (a Popen nobody waited for).

A process whose environment carries SPARKD_TEST_LONG_LIVED (tests/system/harness.py's
containers) belongs to a fixture that outlives the test and cleans it up itself: it and
its descendants are not counted.

The checks are cheap: two thread listings and two scans of /proc per test, and a task
factory on the event loops the test creates.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import threading
import time
import weakref
from collections.abc import Coroutine, Generator, Iterator
from typing import Any, ClassVar

import pytest

LONG_LIVED_ENV = b"SPARKD_TEST_LONG_LIVED="
GRACE_S = 2.0


# -- threads -------------------------------------------------------------------------------


def _leaked_threads(before: set[threading.Thread], deadline: float) -> list[str]:
    leaked = []
    for thread in threading.enumerate():
        if thread in before or thread is threading.current_thread():
            continue
        thread.join(max(0.0, deadline - time.monotonic()))
        if thread.is_alive():
            leaked.append(f"thread {thread.name!r} (daemon={thread.daemon}, {thread!r})")
    return leaked


# -- asyncio tasks -------------------------------------------------------------------------


class _TrackedTask(asyncio.Task[Any]):
    """A task that notices being cancelled by asyncio's loop teardown (it was leaked)."""

    leaks: ClassVar[list[str]] = []  # the current test's list, set by _tracking_tasks

    def cancel(self, msg: Any = None) -> bool:
        # asyncio.runners._cancel_all_tasks cancels whatever is still pending when the main
        # coroutine of asyncio.run() / asyncio.Runner returned.
        if sys._getframe(1).f_code.co_name == "_cancel_all_tasks":
            _TrackedTask.leaks.append(f"asyncio task cancelled by loop teardown: {self!r}")
        return super().cancel(msg)


class _TaskTracker:
    def __init__(self) -> None:
        self.tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()
        self.leaks: list[str] = []

    def factory(
        self,
        loop: asyncio.AbstractEventLoop,
        coro: Coroutine[Any, Any, Any] | Generator[Any, None, Any],
        **kwargs: Any,
    ) -> asyncio.Task[Any]:
        task = _TrackedTask(coro, loop=loop, **kwargs)
        self.tasks.add(task)
        return task

    def leaked(self) -> list[str]:
        pending = [
            f"asyncio task {t.get_name()!r} still pending: {t.get_coro()!r}"
            for t in list(self.tasks)
            if not t.done()
        ]
        return [*self.leaks, *pending]


class _TrackingPolicy(asyncio.DefaultEventLoopPolicy):
    def __init__(self, tracker: _TaskTracker) -> None:
        super().__init__()
        self._tracker = tracker

    def new_event_loop(self) -> asyncio.AbstractEventLoop:
        loop = super().new_event_loop()
        loop.set_task_factory(self._tracker.factory)
        return loop


@contextlib.contextmanager
def _tracking_tasks() -> Iterator[_TaskTracker]:
    tracker = _TaskTracker()
    _TrackedTask.leaks = tracker.leaks
    previous = asyncio.get_event_loop_policy()
    asyncio.set_event_loop_policy(_TrackingPolicy(tracker))
    try:
        yield tracker
    finally:
        asyncio.set_event_loop_policy(previous)
        _TrackedTask.leaks = []


# -- child processes -----------------------------------------------------------------------


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (ppid, state) for every process, from /proc (no psutil: one scan, cheap)."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as stat:
                fields = stat.read().rpartition(b")")[2].split()
        except OSError:
            continue
        table[int(entry)] = (int(fields[1]), fields[0].decode())
    return table


def _is_long_lived(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/environ", "rb") as environ:
            return any(v.startswith(LONG_LIVED_ENV) for v in environ.read().split(b"\0"))
    except OSError:
        return False


def _descendants(table: dict[int, tuple[int, str]], root: int) -> dict[int, str]:
    """pid -> state of root's descendants, leaving out long-lived fixtures' subtrees."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    found: dict[int, str] = {}
    stack = list(children.get(root, []))
    while stack:
        pid = stack.pop()
        found[pid] = table[pid][1]
        stack.extend(children.get(pid, []))
    return found


def _without_long_lived(
    table: dict[int, tuple[int, str]], pids: dict[int, str], root: int
) -> dict[int, str]:
    """pids minus those that are, or descend from, a long-lived fixture's process (which
    may well be older than the test: a module-scoped container)."""
    verdicts: dict[int, bool] = {}

    def exempt(pid: int) -> bool:
        chain: list[int] = []
        verdict = False
        while pid != root and pid in table:
            if pid in verdicts:
                verdict = verdicts[pid]
                break
            chain.append(pid)
            if _is_long_lived(pid):
                verdict = True
                break
            pid = table[pid][0]
        for link in chain:
            verdicts[link] = verdict
        return verdict

    return {pid: state for pid, state in pids.items() if not exempt(pid)}


def _describe(pid: int, state: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            command = cmdline.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        command = "?"
    return f"child process {pid} ({'zombie' if state == 'Z' else 'running'}): {command or '?'}"


def _leaked_processes(before: set[int], deadline: float) -> list[str]:
    me = os.getpid()
    while True:
        table = _process_table()
        new = {p: s for p, s in _descendants(table, me).items() if p not in before}
        new = _without_long_lived(table, new, me)
        if not new or time.monotonic() >= deadline:
            break
        time.sleep(0.05)
    leaked = [_describe(pid, state) for pid, state in sorted(new.items())]
    for pid, state in new.items():
        if state != "Z":
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
    # Reap the direct children killed (their Popen objects, if any, are gone or forgotten).
    for pid in new:
        if table.get(pid, (0, ""))[0] == me:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return leaked


# -- the fixture ---------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "leaks_allowed: skip the thread/task/process leak check (say why in a comment)"
    )


@pytest.fixture(autouse=True)
def no_leaks(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail the test if it leaves threads, asyncio tasks or child processes behind."""
    if request.node.get_closest_marker("leaks_allowed") is not None:
        yield
        return
    threads_before = set(threading.enumerate())
    table = _process_table()
    processes_before = set(_descendants(table, os.getpid()))
    with _tracking_tasks() as tracker:
        yield
    deadline = time.monotonic() + GRACE_S
    leaks = [
        *tracker.leaked(),
        *_leaked_threads(threads_before, deadline),
        *_leaked_processes(processes_before, deadline),
    ]
    if leaks:
        pytest.fail("the test leaked:\n  " + "\n  ".join(leaks), pytrace=False)
