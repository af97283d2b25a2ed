"""`sparkctl pull NAME` and `sparkctl verify NAME`: the store's commands (registered in
sparkd.ctl.main). They work on the files directly, without the daemon.

Exit status: 0 only when every file verified (for `verify`, also no EXTRA file: an engine may
load a stray shard; `pull` only warns about them); 1 (`ExitStatus.FAILURE`) with the list of the
files that did not and why (also for a full disk, a Hub error, no manifest); 5 invalid config,
6 unknown model. With `--json`, stdout carries JSON lines (see sparkd.store.progress), the last
one `{"event": "result", ...}` or `{"event": "error", "code": ..., "message": ...}`.

Heavy imports (rich, aiohttp, huggingface_hub) happen when a command runs, not when sparkctl
starts.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sparkd.config import load_config
from sparkd.ctl.complete import complete_model
from sparkd.ctl.exits import ExitStatus, run
from sparkd.errors import SparkdError
from sparkd.options import config_option, json_option

if TYPE_CHECKING:
    from rich.console import Console
    from rich.progress import Progress, TaskID

    from sparkd.store.plan import FileVerdict, VerifyReport
    from sparkd.store.progress import Phase, Reporter


def escape(text: str) -> str:
    """Text shown through rich markup as it is (a path may hold "[")."""
    from rich.markup import escape as rich_escape

    return rich_escape(text)


class RichReporter:
    """Progress bars for a person: one per file being worked on, one for the total, with
    speed and ETA (rich computes both). Files that are not OK are printed as they finish."""

    def __init__(self, console: Console, *, pulling: bool = False) -> None:
        from rich.progress import (
            BarColumn,
            DownloadColumn,
            Progress,
            TextColumn,
            TimeRemainingColumn,
            TransferSpeedColumn,
        )

        from sparkd.store.plan import ProgressBook

        self.console = console
        self._pulling = pulling  # a pull's first verification: MISSING is what it is for
        self.progress: Progress = Progress(
            TextColumn("{task.description}", justify="left"),
            BarColumn(),
            DownloadColumn(binary_units=True),
            TransferSpeedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=True,
        )
        self._lock = threading.Lock()
        self._book = ProgressBook()
        self._phase: Phase = "verify"
        self._total: TaskID | None = None
        self._tasks: dict[str, TaskID] = {}

    def __enter__(self) -> RichReporter:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def phase(self, phase: Phase, files: Sequence[tuple[str, int, int]]) -> None:
        from sparkd.store.plan import ProgressBook

        with self._lock:
            old = [*self._tasks.values(), *([] if self._total is None else [self._total])]
            for task in old:
                self.progress.remove_task(task)
            self._tasks = {}
            self._phase = phase
            self._book = ProgressBook()
            for path, total, already in files:
                self._book.add_file(path, total, already=already)
            self._total = None
            if files:
                verb = "verifying" if phase == "verify" else "fetching"
                self._total = self.progress.add_task(
                    f"[bold]{verb} {len(files)} file{'s' if len(files) != 1 else ''}",
                    total=self._book.total,
                    completed=self._book.completed,
                )

    def _task(self, path: str) -> TaskID:
        task = self._tasks.get(path)
        if task is None:
            task = self.progress.add_task(
                escape(path),
                total=self._book.totals.get(path, 0),
                completed=self._book.done.get(path, 0),
            )
            self._tasks[path] = task
        return task

    def advance(self, path: str, nbytes: int) -> None:
        with self._lock:
            self._book.done[path] = self._book.done.get(path, 0) + nbytes
            self.progress.advance(self._task(path), nbytes)
            if self._total is not None:
                self.progress.advance(self._total, nbytes)

    def restart(self, path: str, already: int) -> None:
        with self._lock:
            self._book.restart_file(path, already)
            self.progress.update(self._task(path), completed=already)
            if self._total is not None:
                self.progress.update(self._total, completed=self._book.completed)

    def retry(self, path: str, attempt: int, reason: str, delay_s: float) -> None:
        self.progress.console.print(
            f"[yellow]retry[/] {escape(path)}: {escape(reason)} "
            f"(try {attempt}; again in {delay_s:.1f} s)"
        )

    def file_done(self, verdict: FileVerdict) -> None:
        from sparkd.store.plan import Status

        with self._lock:
            task = self._tasks.pop(verdict.path, None)
            if task is not None:
                self.progress.remove_task(task)
        if self._pulling and self._phase == "verify" and verdict.status is not Status.OK:
            if verdict.status is Status.BAD:
                self.progress.console.print(
                    f"[yellow]BAD[/] {escape(verdict.path)}: {escape(verdict.reason)}; "
                    "fetching it again"
                )
        elif verdict.status is not Status.OK:
            self.progress.console.print(
                f"[bold red]{verdict.status.value}[/] {escape(verdict.path)}: "
                f"{escape(verdict.reason)}"
            )
        elif self._phase == "fetch":
            self.progress.console.print(
                f"[green]OK[/] {escape(verdict.path)}: {escape(verdict.reason)}"
            )

    def result(self, report: VerifyReport) -> None:
        pass  # printed by the command, after the bars are gone


def _summary(report: VerifyReport, verb: str) -> str:
    from sparkd.store.plan import Status

    counts = ", ".join(f"{report.count(s)} {s.value}" for s in Status if report.count(s))
    pinned = f" at {report.manifest.revision[:12]}" if report.manifest and (
        report.manifest.revision
    ) else ""
    return f"{verb} {report.model}{pinned}: {counts or 'no files'}"


def _run_store(
    ctx: click.Context,
    *,
    as_json: bool,
    verb: str,
    work: Callable[[Reporter], VerifyReport],
    extra_fails: bool,
) -> None:
    """Run `work` with the reporter `--json` asks for; exit 1 unless every file verified
    (EXTRA files count against `verify`, and are only warned about by `pull`)."""
    from sparkd.store.plan import Status

    def failed(report: VerifyReport) -> bool:
        return bool(report.failures if extra_fails else report.blocking)

    def go() -> None:
        if as_json:
            from sparkd.store.progress import JsonLinesReporter

            try:
                report = work(JsonLinesReporter(sys.stdout))
            except SparkdError as exc:
                click.echo(json.dumps({"event": "error", "code": exc.code, "message": exc.message}))
                raise
            if failed(report):
                sys.exit(ExitStatus.FAILURE)
            return
        from rich.console import Console

        console = Console(stderr=False, highlight=False)
        with RichReporter(console, pulling=verb == "pulled") as reporter:
            report = work(reporter)
        if report.note:
            console.print(f"note: {report.note}")
        if not failed(report):
            console.print(f"[green]{_summary(report, verb)}[/]")
            for v in report.failures:
                if v.status is Status.EXTRA:
                    console.print(f"  warning: EXTRA {v.path}: {v.reason}", markup=False)
            return
        console.print(f"[bold red]{_summary(report, verb)}[/]")
        for v in report.failures:
            console.print(f"  {v.status.value} {v.path}: {v.reason}", markup=False)
        sys.exit(ExitStatus.FAILURE)

    run(ctx, go)


@click.command("pull")
@config_option
@json_option
@click.argument("name", shell_complete=complete_model)
@click.pass_context
def pull(ctx: click.Context, config_file: Path, name: str, *, as_json: bool) -> None:
    """Fetch model NAME's files from its source, verified: SHA-256 of every file, ranged
    resume of partial downloads, only the files that are not right fetched again.

    Exit 0 only when every file verified; 1 with what failed and why."""

    def work(reporter: Reporter) -> VerifyReport:
        from sparkd.store.model import pull_model

        config = load_config(config_file)
        return pull_model(config, config.model(name), reporter=reporter)

    _run_store(ctx, as_json=as_json, verb="pulled", work=work, extra_fails=False)


@click.command("verify")
@config_option
@json_option
@click.option("--full", is_flag=True, help="Hash every file, not only those that changed.")
@click.option("--repair", is_flag=True, help="Fetch the BAD and MISSING files again.")
@click.argument("name", shell_complete=complete_model)
@click.pass_context
def verify(
    ctx: click.Context,
    config_file: Path,
    name: str,
    *,
    as_json: bool,
    full: bool,
    repair: bool,
) -> None:
    """Check model NAME's files against its manifest: each is OK, BAD, MISSING or EXTRA.

    Incremental by default (only files changed since they last verified are read).
    Exit 0 only when every file is OK; 1 with what is not and why."""

    def work(reporter: Reporter) -> VerifyReport:
        from sparkd.store.model import verify_model

        config = load_config(config_file)
        return verify_model(
            config, config.model(name), full=full, repair=repair, reporter=reporter
        )

    _run_store(
        ctx, as_json=as_json, verb="repaired" if repair else "verified", work=work,
        extra_fails=True,
    )
