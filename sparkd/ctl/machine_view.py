"""The machine part of `sparkctl status` and `sparkctl top` (docs/watch.md "Shown and
exported"): a memory bar (engine, other use, page cache, free, the floor), PSI, the desktop's
timer lateness and presence, the GPU, and what the watch did last.

`memory_segments` is the arithmetic of the bar, apart from its drawing, so a test can check it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from rich.console import Console
    from rich.text import Text

    from sparkd.control.status import GpuRecord, MachineRecord, Status

GIB = 1 << 30
BAR_WIDTH = 48


@dataclass(frozen=True, slots=True)
class Segment:
    name: str  # engine, other, page cache, free
    nbytes: int
    cells: int
    char: str
    style: str


def gib(n: float | None) -> str:
    return "?" if n is None else f"{n / GIB:.1f} GiB"


def memory_segments(total: int, available: int, page_cache: int, engine: int,
                    width: int = BAR_WIDTH) -> tuple[Segment, ...]:
    """Split `total` into what the engines hold, other use, page cache and free, in that
    order, each with its share of `width` cells (the cells add up to `width`).

    MemAvailable counts reclaimable page cache as available, so the cache is drawn inside the
    available part (at most all of it) and `free` is the rest; the used part is the engines'
    memory.current (at most all of it: their cgroups also count cache they caused) and the
    other processes' use."""
    available = max(0, min(available, total))
    used = total - available
    engine = max(0, min(engine, used))
    cache = max(0, min(page_cache, available))
    parts = (("engine", engine, "█", "bold magenta"), ("other", used - engine, "▓", "yellow"),
             ("page cache", cache, "▒", "cyan"), ("free", available - cache, "░", "green"))
    cells = _cells([p[1] for p in parts], total, width)
    return tuple(Segment(name, n, c, ch, style)
                 for (name, n, ch, style), c in zip(parts, cells, strict=True))


def _cells(sizes: list[int], total: int, width: int) -> list[int]:
    """Largest-remainder rounding: the cells add up to `width` exactly."""
    if total <= 0:
        return [0] * (len(sizes) - 1) + [width]
    exact = [s * width / total for s in sizes]
    cells = [int(x) for x in exact]
    for i in sorted(range(len(sizes)), key=lambda i: exact[i] - cells[i],
                    reverse=True)[:width - sum(cells)]:
        cells[i] += 1
    return cells


def floor_cell(total: int, floor: int, width: int = BAR_WIDTH) -> int | None:
    """The cell the floor mark goes before: the floor trips when the available part (right of
    the used part) shrinks below `floor`, i.e. when the used part reaches this cell."""
    if total <= 0 or floor <= 0:
        return None
    return max(0, min(width - 1, round((total - floor) * width / total)))


def memory_bar(status: Status, width: int = BAR_WIDTH) -> Text | None:
    from rich.text import Text

    mem, machine = status.memory, status.machine
    if mem.total_bytes is None or mem.available_bytes is None:
        return None
    engine = sum(machine.engine_memory_bytes.values()) if machine else 0
    segments = memory_segments(mem.total_bytes, mem.available_bytes, mem.page_cache_bytes or 0,
                               engine, width)
    cells = "".join(s.char * s.cells for s in segments)
    styles = [s.style for s in segments for _ in range(s.cells)]
    floor = machine.floor_bytes if machine else None
    mark = None if floor is None else floor_cell(mem.total_bytes, floor, width)
    bar = Text("[")
    for i, (ch, style) in enumerate(zip(cells, styles, strict=True)):
        if i == mark:
            bar.append("|", style="bold red")
        bar.append(ch, style=style)
    bar.append("]\n")
    legend = [(engine_legend(status, segments[0].nbytes), "bold magenta"),
              (f"other {gib(segments[1].nbytes)}", "yellow"),
              (f"page cache {gib(segments[2].nbytes)}", "cyan"),
              (f"free {gib(segments[3].nbytes)}", "green")]
    if floor is not None:
        legend.append((f"| floor {gib(floor)}", "bold red"))
    for i, (words, style) in enumerate(legend):
        bar.append(" · " if i else "")
        bar.append(words, style=style)
    return bar


RUNNING_STATES = ("active", "activating", "reloading")  # the daemon reads these engines' memory


def engine_legend(status: Status, nbytes: int) -> str:
    """The engines' part of the bar's legend. A running engine whose memory.current could not
    be read is not in the machine record: its memory is in "other", and the legend says so
    (never "engine 0.0 GiB" for an engine that holds 60)."""
    read = status.machine.engine_memory_bytes if status.machine is not None else {}
    running = sum(1 for e in status.engines
                  if e.active_state in RUNNING_STATES and e.main_pid > 0)
    unread = running - len(read)
    if unread <= 0:
        return f"engine {gib(nbytes)}"
    if not read:
        return f"engine ? ({running} running, no memory.current reading: counted in other)"
    return (f"engine {gib(nbytes)} + {unread} running without a memory.current reading "
            "(counted in other)")


def pressure_line(status: Status) -> str:
    if not status.pressure:
        return "pressure: [dim]n/a[/]"
    parts = []
    for name, p in sorted(status.pressure.items()):
        full = "" if p.full_avg10 is None else f" full {p.full_avg10:.1f}%"
        parts.append(f"{name} some {p.some_avg10:.1f}%{full}")
    return "pressure (avg10): " + " · ".join(parts)


def gpu_line(g: GpuRecord) -> str:
    def pct(v: int | None) -> str:
        return "n/a" if v is None else f"{v}%"

    used = (f"{gib(g.memory_used_bytes)} of {gib(g.memory_total_bytes)}"
            if g.memory_total_bytes is not None else "memory: unified (see above)")
    temp = "n/a" if g.temperature_c is None else f"{g.temperature_c} °C"
    power = "n/a" if g.power_w is None else f"{g.power_w:.1f} W"
    return (f"gpu {g.index}: {g.name}, {used}, busy {pct(g.utilization_pct)}, memory busy "
            f"{pct(g.memory_utilization_pct)}, {temp}, {power}, {len(g.processes)} process(es) "
            f"using {gib(g.process_bytes)}")


def desktop_line(machine: MachineRecord | None) -> str:
    if machine is None:
        return "desktop: [dim]unknown · timer lateness n/a (the daemon does not say)[/]"
    lateness = ("n/a" if machine.lateness_p99_ms is None
                else f"p99 {machine.lateness_p99_ms:.1f} ms")
    return f"desktop: {machine.desktop} · timer lateness {lateness}"


def action_lines(machine: MachineRecord | None, now: float) -> list[str]:
    from rich.markup import escape

    from sparkd.ctl.status import format_age

    if machine is None:
        return []
    counts = ", ".join(f"{kind} {n}" for kind, n in sorted(machine.action_counts.items()))
    swaps = ", ".join(f"{end} {n}" for end, n in sorted(machine.swaps.items()))
    lines = [f"watch actions: {counts or 'none'} · swaps: {swaps or 'none'}"]
    for a in reversed(machine.actions[-3:]):  # newest first
        lines.append(f"  {format_age(now - a.at)} ago [yellow]{a.kind}[/] {escape(a.model)}: "
                     f"{escape(a.detail)}")
    return lines


def render_machine(status: Status, console: Console, *, now: float | None = None) -> None:
    """Print the machine's part of the status (after the engines' table)."""
    from rich.markup import escape

    now = time.time() if now is None else now
    mem = status.memory
    if mem.error is not None:
        console.print(f"memory: [red]{escape(mem.error)}[/]")
    else:
        console.print(
            f"memory: {gib(mem.available_bytes)} available of "
            f"{gib(mem.total_bytes)}, page cache {gib(mem.page_cache_bytes)}"
            + (f" [dim]· {mem.accounting}[/]" if mem.accounting else "")
        )
        bar = memory_bar(status)
        if bar is not None:
            console.print(bar)
    console.print(pressure_line(status))
    console.print(desktop_line(status.machine))
    gpu = status.gpu
    if gpu is not None and gpu.error:
        console.print(f"gpu: [dim]{escape(gpu.error)}[/]")
    for g in () if gpu is None else gpu.gpus:
        console.print(escape(gpu_line(g)))
    for line in action_lines(status.machine, now):
        console.print(line)
