"""Pressure stall information (/proc/pressure/*): how much of the time tasks waited for CPU,
memory or IO. A desktop that freezes while inference runs shows up here first (memory `full`
means every non-idle task stalled at once).

`parse_psi(text)` is pure; `read_pressure()` reads the files. Triggers (writing thresholds
into the files) need CAP_SYS_RESOURCE and were refused where sparkd was developed (FACTS.md),
so sparkd polls avg10, which always works.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

RESOURCES: Final = ("cpu", "memory", "io")
PSI_DIR: Final = Path("/proc/pressure")


@dataclass(frozen=True, slots=True)
class PsiLine:
    avg10: float
    avg60: float
    avg300: float
    total_us: int


@dataclass(frozen=True, slots=True)
class Pressure:
    some: PsiLine
    full: PsiLine | None  # the kernel has no `full` line for cpu before 5.13

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"some_avg10": self.some.avg10, "some_avg60": self.some.avg60}
        if self.full is not None:
            out |= {"full_avg10": self.full.avg10, "full_avg60": self.full.avg60}
        return out


class PsiError(ValueError):
    pass


def parse_psi(text: str) -> Pressure:
    lines: dict[str, PsiLine] = {}
    for raw in text.splitlines():
        kind, _, rest = raw.strip().partition(" ")
        if kind not in ("some", "full"):
            continue
        fields = dict(item.split("=", 1) for item in rest.split() if "=" in item)
        try:
            lines[kind] = PsiLine(float(fields["avg10"]), float(fields["avg60"]),
                                  float(fields["avg300"]), int(fields["total"]))
        except (KeyError, ValueError) as exc:
            raise PsiError(f"malformed PSI line {raw!r}: {exc}") from None
    if "some" not in lines:
        raise PsiError("no 'some' line in PSI text")
    return Pressure(some=lines["some"], full=lines.get("full"))


def read_pressure(directory: Path = PSI_DIR) -> dict[str, Pressure]:
    """Every resource's pressure; empty when the kernel has no PSI (boot with psi=1)."""
    out: dict[str, Pressure] = {}
    for resource in RESOURCES:
        try:
            out[resource] = parse_psi((directory / resource).read_text())
        except (OSError, PsiError):
            continue
    return out
