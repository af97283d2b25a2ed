"""Cuts at random points of the state and accepted-config writes: a writer process saves the
state and the accepted config in a loop (as swaps and reloads do) and is killed with SIGKILL
at a random moment, 200 times. After every cut, the state parses to the old or the new value
and the accepted copy is one whole config text: never a mix, never empty, never garbage.

A SIGKILL is not a power loss: the page cache survives it. What it cuts at every point is
sparkd's own sequence (temp file, write, fsync, rename, directory fsync). The same cuts as
container power cuts with a boot after each: tests/system/test_write_cuts.py; what a power loss
that drops unsynced pages can leave: tests/unit/test_crash_consistency.py."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

from sparkd.config import parse_config
from sparkd.state import StateStore

CUTS = 200
CONFIGS = [f'[daemon]\ndefault_model = "{m}"\n\n[models.{m}]\nengine = "sim"\nport = {p}\n'
           + "# padding so that a write takes a while\n" * 2000 for m, p in (("a", 8101),
                                                                          ("b", 8102))]

# A zygote: imports once, then forks one writer per cut (a cut costs milliseconds, not a
# Python start-up). Each writer goes on from the number the state holds.
WRITER = """
import os, sys
from pathlib import Path
from sparkd.accepted import save_accepted
from sparkd.config import parse_config
from sparkd.state import State, StateStore

state_dir = Path(sys.argv[1])
texts = [Path(sys.argv[2]).read_text(), Path(sys.argv[3]).read_text()]
store = StateStore(state_dir)
configs = [parse_config(t.replace("[daemon]", f'[daemon]\\nstate_dir = "{state_dir}"', 1),
                        source=state_dir / f"etc-{i}.toml") for i, t in enumerate(texts)]
for _ in sys.stdin:
    pid = os.fork()
    if pid == 0:
        n = store.load()[0].last_swap_id
        while True:
            n += 1
            store.save(State(desired_model="ab"[n % 2], last_swap_id=n))
            save_accepted(configs[n % 2])
    print(pid, flush=True)
    os.waitpid(pid, 0)
    print("reaped", flush=True)
"""


def test_state_and_accepted_config_survive_200_cuts(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    sources = []
    for i, text in enumerate(CONFIGS):
        path = tmp_path / f"config-{i}.toml"
        path.write_text(text)
        sources.append(path)
    expected = {t.replace("[daemon]", f'[daemon]\nstate_dir = "{state_dir}"', 1)
                for t in CONFIGS}
    rng = random.Random(1203)
    zygote = subprocess.Popen([sys.executable, "-c", WRITER, str(state_dir),
                               *map(str, sources)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    assert zygote.stdin is not None and zygote.stdout is not None
    try:
        for _ in range(CUTS):
            zygote.stdin.write("go\n")
            zygote.stdin.flush()
            pid = int(zygote.stdout.readline())
            time.sleep(rng.uniform(0, 0.04))
            os.kill(pid, signal.SIGKILL)
            assert zygote.stdout.readline() == "reaped\n"
            state, warning = StateStore(state_dir).load()
            assert warning is None, warning
            if state.last_swap_id:
                assert state.desired_model == "ab"[state.last_swap_id % 2]
            accepted = state_dir / "accepted.toml"
            if accepted.exists():
                text = accepted.read_text()
                assert text in expected
                parse_config(text, source=accepted)
    finally:
        zygote.stdin.close()
        zygote.wait(10)
        zygote.stdout.close()
    # Writes went on between the cuts (how many depends on the disk's fsync and the load).
    assert state.last_swap_id > CUTS // 10
