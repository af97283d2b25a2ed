"""Power cuts at random points of sparkd's state and accepted-config writes (issue 12), shared
by tests/system/test_write_cuts.py and bench/write_cuts.py.

One cut, in a booted systemd container with the .deb installed and sparkd serving:

1. A writer inside the container (the package's own `StateStore.save` and `save_accepted`,
   from /usr/lib/sparkd/python) writes write 1, 2, 3, ... in a tight loop: the state
   (desired model alternating a/b, a swap number unique to the cut) to
   /var/lib/sparkd/state.toml, then one of two whole configs to /var/lib/sparkd/accepted.toml.
   Before each write it records `k S` or `k A` in a progress file (no fsync: the page cache
   survives a container's cut, so the progress is exact at the cut).
2. After a random delay the host SIGKILLs the container's PID 1 (harness.Container.power_cut).
3. On the host, before the next boot: the state is the old value (write k-1's, or what was
   there before the writer started) or the new one (write k's), byte for byte; the accepted
   copy likewise (`k S`: the accepted copy is write k-1's). Never a mix, never empty.
4. The same disk is booted; /etc/sparkd.toml is valid on even cuts and refused (a typo) on odd
   ones, so sparkd and the gateway then run on the accepted copy that was being written. A chat
   completion for the state's desired model answers 200 through the gateway; no state file
   was set aside (`state.toml.corrupt-*`) and sparkd reports no state warning.

What a container cut is not: a power loss. The container's disk is a tmpfs of the host, whose
page cache outlives the kill of PID 1, so bytes written but not synced survive. This cuts
sparkd's write sequence at every point between its syscalls (temp file, write, fsync, rename,
directory fsync) with a real boot after it; what a lost page cache can do to that sequence is
tests/unit/test_crash_consistency.py's part (every crash state the file system model allows).
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from checks import CHAT_POLLER, status, wait_for
from harness import Container

from sparkd.errors import StateError
from sparkd.state import State, parse_state, render_state

STATE = "/var/lib/sparkd/state.toml"
ACCEPTED = "/var/lib/sparkd/accepted.toml"
PROGRESS = "/var/lib/sparkd-cuts/progress"
WRITER_UNIT = "cut-writer"
SWAP_BASE = 1_000_000  # the writer's swap numbers: SWAP_BASE * cut + k

CONFIG = """\
[daemon]
default_model = "a"
memory_reserve_gib = 1
health_interval_s = 0.2
last_good_after_s = 0
settle_timeout_s = 0.5

[models.a]
engine = "sim"
port = 8101
memory_gib = 0.1
load_timeout_s = 30
args = ["--load-seconds", "0.2", "--weights-mib", "1"]

[models.b]
engine = "sim"
port = 8102
memory_gib = 0.1
load_timeout_s = 30
args = ["--load-seconds", "0.2", "--weights-mib", "1"]
"""
# /etc/sparkd.toml on odd cuts: refused at boot (an unknown key), so sparkd and the gateway run
# on the accepted copy.
REFUSED = CONFIG.replace("memory_gib = 0.1", "memory_gb = 0.1", 1)
# The two configs the writer keeps as accepted, alternately: whole configs that differ, long
# enough (about 12 KiB) that a cut can fall inside one write as often as in a state write.
ACCEPTED_TEXTS = tuple(f"# accepted copy {tag}, written by the cut writer\n{CONFIG}"
                       + f"# padding {tag}: a write of this file takes a while\n" * 2000
                       for tag in ("A", "B"))

WRITER = r"""
import os, sys
sys.path[:0] = ["/usr/lib/sparkd/python"]
from pathlib import Path
from sparkd.accepted import save_accepted
from sparkd.config import parse_config
from sparkd.state import State, StateStore

cut, base, boot_id = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
configs = [parse_config(Path(p).read_text(), source=Path(p)) for p in sys.argv[4:6]]
store = StateStore(Path("/var/lib/sparkd"))
progress = os.open(sys.argv[6], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
k = 0
while True:
    k += 1
    os.pwrite(progress, f"{k:>12} S\n".encode(), 0)
    store.save(State(desired_model="ab"[k % 2], last_good_model="a", boot_id=boot_id,
                     last_swap_id=base + k))
    os.pwrite(progress, f"{k:>12} A\n".encode(), 0)
    save_accepted(configs[k % 2])
"""



def expected_state(cut: int, k: int, boot_id: str) -> str:
    """The bytes of the writer's write k in cut `cut` (rendered by this checkout's sparkd,
    the code the .deb was built from)."""
    return render_state(State(desired_model="ab"[k % 2], last_good_model="a",
                              boot_id=boot_id, last_swap_id=SWAP_BASE * cut + k))


@dataclass
class Summary:
    """What the cuts found. `failures` must stay empty."""

    cuts: int = 0
    state: Counter[str] = field(default_factory=Counter)  # old / new
    accepted: Counter[str] = field(default_factory=Counter)  # old / new
    phase: Counter[str] = field(default_factory=Counter)  # which write the cut fell in
    writes: list[int] = field(default_factory=list)  # writes done by the writer, per cut
    temp_files: int = 0  # cuts that left a write's temp file (removed by the next start)
    boot_to_chat_s: list[float] = field(default_factory=list)  # nspawn start -> first 200
    cut_s: list[float] = field(default_factory=list)  # one whole cut, writer start to quiet
    failures: list[str] = field(default_factory=list)

    def as_json(self) -> str:
        # Not dataclasses.asdict: it rebuilds a Counter from (key, value) pairs, counting them.
        return json.dumps({f.name: getattr(self, f.name) for f in dataclasses.fields(self)},
                          sort_keys=True)


def prepare(box: Container) -> None:
    """sparkd serving `a` on CONFIG, nothing of an earlier run left, the writer's files in
    place."""
    box.exec(["systemctl", "stop", "sparkd", "sparkd-gateway"])
    box.sh("systemctl stop 'sparkd-engine@*'; systemctl reset-failed; "
           f"rm -rf /var/lib/sparkd/state.toml* {ACCEPTED} /var/lib/sparkd/.*.tmp-* "
           f"{Path(PROGRESS).parent}; mkdir -p {Path(PROGRESS).parent}")
    box.exec(["tee", "/etc/sparkd.toml"], input=CONFIG, quiet=True)
    for tag, text in zip("AB", ACCEPTED_TEXTS, strict=True):
        box.exec(["tee", f"/var/lib/sparkd-cuts/accepted-{tag}.toml"], input=text, quiet=True)
    box.exec(["tee", "/var/lib/sparkd-cuts/writer.py"], input=WRITER, quiet=True)
    box.exec(["systemctl", "start", "sparkd", "sparkd-gateway"])
    wait_quiet(box, "a")


def wait_quiet(box: Container, model: str, timeout: float = 60.0) -> None:
    """sparkd serves `model`, has recorded it as last good and writes nothing more."""
    def quiet() -> bool:
        s = status(box)
        return (s is not None and s["swap"] is None and s["active_model"] == model
                and s["last_good_model"] == model
                and s["daemon"]["status_line"].startswith(f"{model}: serving, healthy"))

    wait_for(f"sparkd to serve {model} and record it as last good", quiet, timeout=timeout)


def read(box: Container, path: str) -> str | None:
    try:
        return box.host_path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return None


def temp_files(box: Container) -> list[str]:
    return sorted(p.name for p in box.host_path("/var/lib/sparkd").iterdir()
                  if ".tmp-" in p.name)


def one_cut(box: Container, cut: int, rng: random.Random, summary: Summary) -> None:
    start = time.monotonic()
    refused = cut % 2 == 1
    box.exec(["tee", "/etc/sparkd.toml"], input=REFUSED if refused else CONFIG, quiet=True)
    old_state, old_accepted = read(box, STATE), read(box, ACCEPTED)
    boot_id = box.boot_id()
    box.exec(["rm", "-f", PROGRESS])
    box.exec(["systemd-run", f"--unit={WRITER_UNIT}", "--collect", "--quiet",
              "/usr/bin/python3", "/var/lib/sparkd-cuts/writer.py", str(cut),
              str(SWAP_BASE * cut), boot_id, "/var/lib/sparkd-cuts/accepted-A.toml",
              "/var/lib/sparkd-cuts/accepted-B.toml", PROGRESS], quiet=True)
    wait_for("the writer's first write", lambda: bool((read(box, PROGRESS) or "").strip()),
             timeout=30)
    time.sleep(rng.uniform(0.0, 0.3))
    box.power_cut()

    # The disk as the next boot finds it (the overlay is mounted again, nothing runs).
    progress = (read(box, PROGRESS) or "").split()
    k, phase = int(progress[0]), progress[1]
    summary.cuts += 1
    summary.writes.append(k)
    summary.phase[phase] += 1
    state, accepted = read(box, STATE), read(box, ACCEPTED)
    new_state = expected_state(cut, k, boot_id)
    old = old_state if k == 1 else expected_state(cut, k - 1, boot_id)
    new_accepted = ACCEPTED_TEXTS[k % 2]
    prev_accepted = old_accepted if k == 1 else ACCEPTED_TEXTS[(k - 1) % 2]
    where = f"cut {cut} in write {k} {phase}"
    if state == new_state:
        summary.state["new"] += 1
    elif state == old:
        summary.state["old"] += 1
    else:
        summary.failures.append(f"{where}: state.toml is neither write {k - 1}'s nor write "
                                f"{k}'s: {state!r:.300}")
    if accepted == new_accepted and phase == "A":
        summary.accepted["new"] += 1
    elif accepted == prev_accepted:
        summary.accepted["old"] += 1
    else:
        summary.failures.append(f"{where}: accepted.toml is not one whole config of write "
                                f"{k - 1} or {k} ({len(accepted or '')} characters)")
    summary.temp_files += bool(temp_files(box))

    # The next boot: a chat completion for the model the state names, through the gateway.
    try:
        desired = parse_state(state or "").desired_model or "a"
    except StateError:
        desired = "a"  # a failure already: sparkd sets it aside and starts the default
    t0 = time.time()
    box.boot()
    res = box.exec(["python3", "-c", CHAT_POLLER, desired, "90"], timeout=120, check=False,
                   quiet=True)
    if res.returncode != 0:
        summary.failures.append(f"{where}: after the boot, no chat completion for {desired}: "
                                f"{res.stderr.strip()[-500:]}")
        box.wait_running()
        return
    summary.boot_to_chat_s.append(round(json.loads(res.stdout)["t"] - t0, 3))
    wait_quiet(box, desired)
    s = status(box) or {}
    aside = box.exec(["sh", "-c", f"ls {STATE}.corrupt-* 2>/dev/null || true"]).stdout.split()
    if aside or s.get("daemon", {}).get("state_warning"):
        summary.failures.append(f"{where}: the state was set aside: {aside} "
                                f"{s.get('daemon', {}).get('state_warning')}")
    if temp_files(box):
        summary.failures.append(f"{where}: temp files left after sparkd's start: "
                                f"{temp_files(box)}")
    summary.cut_s.append(round(time.monotonic() - start, 3))


def run_cuts(box: Container, cuts: int, *, seed: int) -> Summary:
    rng = random.Random(seed)
    summary = Summary()
    prepare(box)
    for cut in range(1, cuts + 1):
        one_cut(box, cut, rng, summary)
    return summary
