"""PURE: the desktop ladder's keys in sparkd.toml `[daemon]` (docs/watch.md "The desktop
ladder"), kept out of sparkd.config (near its size limit). `parse_desktop` reads them with the
same typed checks (file, key, what was expected, what was found)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from sparkd.config_checks import Validator
from sparkd.monitor.desktop import PSI_LINES, Limits, Step

PRESENCE_CHOICES: Final = ("detect", "present", "absent")
LATENESS_FILE: Final = Path("/run/sparkd-lateness/lateness")


def _default_psi() -> dict[tuple[str, str], float]:
    # cpu some: half the time a runnable task waited; memory full: every task stalled a tenth
    # of the time (daemon.pressure_warn_pct's default); io full likewise a fifth.
    return {("cpu", "some"): 50.0, ("memory", "full"): 10.0, ("io", "full"): 20.0}


@dataclass(frozen=True, slots=True)
class DesktopConfig:
    # The steps, in order; [] turns the ladder off.
    ladder: tuple[Step, ...] = (Step.WEIGHTS, Step.LATENCY_MOE, Step.STOP)
    # "detect" (logind graphical sessions, display servers among NVML's graphics processes),
    # or "present"/"absent" to say it (a container without logind; tests).
    presence: str = "detect"
    psi_pct: Mapping[tuple[str, str], float] = field(default_factory=_default_psi)
    lateness_p99_ms: float = 20.0
    over_s: float = 10.0
    restore_s: float = 60.0
    # The weights the first step sets on sparkd.slice, the engines' slice (systemd's default
    # is 100; units/sparkd.slice ships 50), and the factor it multiplies a MemoryHigh= that
    # is set by.
    cpu_weight: int = 1
    io_weight: int = 1
    memory_high_factor: float = 0.9
    lateness_file: Path = LATENESS_FILE
    # The probe's report is stale (not used) after this long without a rewrite.
    lateness_stale_s: float = 5.0

    def limits(self) -> Limits:
        return Limits(psi_pct=dict(self.psi_pct), lateness_p99_ms=self.lateness_p99_ms,
                      over_s=self.over_s, restore_s=self.restore_s, ladder=self.ladder)


def _psi_key(resource: str, kind: str) -> str:
    return f"desktop_psi_{resource}_{kind}_pct"


#: The keys in [daemon] (sparkd.config adds them to the known ones).
DESKTOP_KEYS: Final = (
    "desktop_ladder", "desktop_presence", *(_psi_key(r, k) for r, k in PSI_LINES),
    "desktop_lateness_p99_ms", "desktop_over_s", "desktop_restore_s", "desktop_cpu_weight",
    "desktop_io_weight", "desktop_memory_high_factor", "desktop_lateness_file",
    "desktop_lateness_stale_s",
)


def parse_desktop(v: Validator, t: Mapping[str, Any]) -> DesktopConfig:
    d = DesktopConfig()
    steps = [s.value for s in Step]
    ladder: tuple[Step, ...] = d.ladder
    if "desktop_ladder" in t:
        raw = t["desktop_ladder"]
        if not isinstance(raw, list) or not all(isinstance(s, str) for s in raw):
            v.fail("daemon.desktop_ladder", f"a list of steps out of {steps} ([] turns the "
                   "ladder off)", raw)
        unknown = [s for s in raw if s not in steps]
        if unknown:
            v.fail("daemon.desktop_ladder", f"steps out of {steps}", unknown[0])
        if len(set(raw)) != len(raw):
            v.fail("daemon.desktop_ladder", "each step at most once", raw)
        ladder = tuple(Step(s) for s in raw)
    psi = {(r, k): v.number(t, f"daemon.{_psi_key(r, k)}", d.psi_pct.get((r, k), 0.0),
                            lo=0, hi=100)
           for r, k in PSI_LINES}
    return DesktopConfig(
        ladder=ladder,
        presence=v.choice(t, "daemon.desktop_presence", PRESENCE_CHOICES, d.presence),
        psi_pct={key: pct for key, pct in psi.items() if pct > 0},
        lateness_p99_ms=v.number(t, "daemon.desktop_lateness_p99_ms", d.lateness_p99_ms, lo=0,
                                 hi=10_000),
        over_s=v.number(t, "daemon.desktop_over_s", d.over_s, lo=0, hi=3600),
        restore_s=v.number(t, "daemon.desktop_restore_s", d.restore_s, lo=0, hi=86400),
        cpu_weight=v.integer(t, "daemon.desktop_cpu_weight", d.cpu_weight, lo=1, hi=10000),
        io_weight=v.integer(t, "daemon.desktop_io_weight", d.io_weight, lo=1, hi=10000),
        memory_high_factor=v.number(t, "daemon.desktop_memory_high_factor",
                                    d.memory_high_factor, lo=0.1, hi=1),
        lateness_file=v.abspath(t, "daemon.desktop_lateness_file", d.lateness_file),
        lateness_stale_s=v.number(t, "daemon.desktop_lateness_stale_s", d.lateness_stale_s,
                                  lo=0.1, hi=3600),
    )
