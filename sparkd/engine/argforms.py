"""PURE: how the engines read a word of their command line before looking it up, so that
sparkd sees a flag the way the engine does (`sparkd check-config`'s parser check, and the
render finding the model's own `--moe-backend`)."""

from __future__ import annotations

from collections.abc import Iterable


def llama_word(word: str) -> str:
    """A word as llama-server looks it up: a `--` argument with its underscores made dashes
    (llama.cpp b9093 and b11434 common/arg.cpp, the argv loop: `std::replace(arg.begin(),
    arg.end(), '_', '-')` when the argument starts with "--"), so `--ctx_size` is
    `--ctx-size`."""
    return word.replace("_", "-") if word.startswith("--") else word


def vllm_word(word: str) -> str:
    """A word as vLLM's parser reads it: a `--` argument's name (up to `=` and the first `.`)
    with its underscores made dashes (vLLM's FlexibleArgumentParser.parse_args in vllm/utils:
    "Convert underscores to dashes ... in argument names", its docstring "allows both
    underscore and dash in names"; read in upstream's source, not replayed on each recorded
    release), so `--max_model_len` is `--max-model-len`."""
    if not word.startswith("--"):
        return word
    name, eq, value = word.partition("=")
    head, dot, rest = name.partition(".")
    return head.replace("_", "-") + dot + rest + eq + value



def flag_value(args: Iterable[str], flag: str) -> str | None:
    """The value given to `flag` in args (`--flag V` or `--flag=V`, read as vLLM reads the
    words), or None. Given more than once, the last: argparse keeps the last value, and so do
    the engines."""
    words = [vllm_word(a) for a in args]
    found: str | None = None
    for i, a in enumerate(words):
        if a == flag and i + 1 < len(words):
            found = words[i + 1]
        elif a.startswith(flag + "="):
            found = a.split("=", 1)[1]
    return found
