"""sparkd's replay of llama-server's argument loop (sparkd.engine.parsers.check_argv, which
`sparkd check-config` runs on a llama.cpp model's `args`) against the real llama-server b11434
that `make llama-server` builds: for each line, check-config refuses it exactly when the real
server refuses it.

The real server is asked without a model: `--version` after the words makes llama-server
parse them and exit 0, or exit 1 on the first word it refuses (common/arg.cpp at b11434: the
argv loop looks each word up whole, `--a_b` read as `--a-b`; a removed flag's handler
throws).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from sparkd.engine.parsers import check_argv, fixture

LINES: list[tuple[str, ...]] = [
    ("-c", "4096"),
    ("--ctx-size", "4096"),
    ("--ctx_size", "4096"),  # llama.cpp reads underscores as dashes
    ("--ctx-size=4096",),  # no --flag=value form: "error: invalid argument"
    ("--spec-draft-n-max=4",),
    ("--draft-max", "4"),  # removed: "use --spec-draft-n-max"
    ("--draft_max", "4"),
    ("--no_jinja",),
    ("--bogus-flag", "1"),
]


def real_refuses(binary: Path, words: tuple[str, ...]) -> bool:
    r = subprocess.run([str(binary), *words, "--version"], capture_output=True, text=True,
                       timeout=30, check=False)
    assert r.returncode in (0, 1), (words, r.returncode, r.stderr[-2000:])
    return r.returncode == 1


@pytest.mark.parametrize("words", LINES, ids=" ".join)
def test_check_config_refuses_what_the_real_server_refuses(
    llama_server_binary: Path, words: tuple[str, ...],
) -> None:
    problems = check_argv(fixture("llamacpp", "11434"), list(words))
    assert bool(problems) == real_refuses(llama_server_binary, words), problems
