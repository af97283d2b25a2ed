"""Runs INSIDE an engine's own Python (a throwaway venv made by scripts/engine_fixtures.py).

Builds the engine's real argument parser and prints, as JSON on stdout, every flag with its
type, choices and arity, and the environment variables the engine's `envs` module knows.
With `--check ARGV_JSON`, also parses those command lines with the real parser, runs the
engine's own validation and prints what it said for each.

Standard library only (the engine's venv has no sparkd). Usage:

    python engine_probe.py vllm|sglang [--check FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.metadata
import json
import os
import sys
from collections.abc import Callable
from typing import Any

MARKER = "=== sparkd engine_probe JSON ==="
FORCED: list[str] = []  # what the probe had to set up for the parser to build


def _type_name(fn: object) -> str:
    """A name for an argparse `type=`, looking through vLLM's parse_type/optional_type
    closures to the callable they wrap (json.loads, int, ...)."""
    if fn is None:
        return "str"
    names: list[str] = []
    seen: set[int] = set()

    def walk(f: object) -> None:
        if id(f) in seen or not callable(f):
            return
        seen.add(id(f))
        name = getattr(f, "__qualname__", None) or getattr(f, "__name__", None) or type(f).__name__
        module = getattr(f, "__module__", "") or ""
        names.append(f"{module}.{name}" if module not in ("builtins", "") else name)
        for cell in getattr(f, "__closure__", None) or ():
            with contextlib.suppress(ValueError):
                walk(cell.cell_contents)
        inner = getattr(f, "func", None)  # functools.partial
        if inner is not None:
            walk(inner)

    walk(fn)
    return " > ".join(names)


def _kind(action: argparse.Action) -> str:
    cls = type(action).__name__
    if cls in ("_StoreTrueAction", "_StoreFalseAction", "_StoreConstAction", "_CountAction"):
        return "switch"
    if cls == "BooleanOptionalAction":
        return "bool_optional"
    if cls in ("_HelpAction", "_VersionAction"):
        return "help"
    return "value"


def describe(parser: argparse.ArgumentParser) -> dict[str, Any]:
    flags: dict[str, Any] = {}
    positionals: list[dict[str, Any]] = []
    for action in parser._actions:
        entry = {
            "kind": _kind(action),
            "type": _type_name(action.type) if _kind(action) == "value" else None,
            "choices": sorted(str(c) for c in action.choices)
            if action.choices is not None and not isinstance(action.choices, dict) else None,
            "nargs": action.nargs if isinstance(action.nargs, str | type(None)) else int(
                action.nargs),
            "dest": action.dest,
            "deprecated": bool(getattr(action, "deprecated", False)),
        }
        if not action.option_strings:
            positionals.append(entry)
            continue
        for flag in action.option_strings:
            flags[flag] = entry
    return {"flags": dict(sorted(flags.items())), "positionals": positionals}


def vllm_parser() -> tuple[argparse.ArgumentParser, Callable[[list[str]], str]]:
    os.environ.setdefault("VLLM_TARGET_DEVICE", "cpu")
    # Releases before VLLM_TARGET_DEVICE was honoured (0.11: vllm/platforms/__init__.py
    # cpu_platform_plugin asks only whether vLLM was built for the CPU) find no platform on a
    # machine without a GPU: use vLLM's own CPU platform, and say so.
    platforms = importlib.import_module("vllm.platforms")
    if "_current_platform" in vars(platforms):
        current = platforms.current_platform
        if type(current).__name__ == "UnspecifiedPlatform":
            vars(platforms)["_current_platform"] = importlib.import_module(
                "vllm.platforms.cpu").CpuPlatform()
            FORCED.append("vllm.platforms.current_platform = CpuPlatform() (not detected)")
    # The engine is imported by name: it lives in its own venv, not in sparkd's.
    serve_mod = importlib.import_module("vllm.entrypoints.cli.serve")
    AsyncEngineArgs = importlib.import_module("vllm.engine.arg_utils").AsyncEngineArgs
    try:
        utils = importlib.import_module("vllm.utils.argparse_utils")
    except ImportError:  # older releases
        utils = importlib.import_module("vllm.utils")
    FlexibleArgumentParser = utils.FlexibleArgumentParser

    top = FlexibleArgumentParser(prog="vllm")
    subparsers = top.add_subparsers(required=False, dest="subparser")
    (cmd,) = [c for c in serve_mod.cmd_init() if c.name == "serve"]
    serve = cmd.subparser_init(subparsers)

    def check(argv: list[str]) -> str:
        args = top.parse_args(argv)
        if args.model_tag is not None:
            args.model = args.model_tag
        cmd.validate(args)
        AsyncEngineArgs.from_cli_args(args)
        return "ok"

    return serve, check


def sglang_parser() -> tuple[argparse.ArgumentParser, Callable[[list[str]], str]]:
    server_args = importlib.import_module("sglang.srt.server_args")
    ServerArgs, prepare_server_args = server_args.ServerArgs, server_args.prepare_server_args

    parser = argparse.ArgumentParser(prog="sglang serve")
    ServerArgs.add_cli_args(parser)

    def check(argv: list[str]) -> str:
        parser.parse_args(argv)  # the real parser first: flags, types, choices
        try:
            prepare_server_args(argv)
        except RuntimeError as exc:
            if "accelerator" not in str(exc).lower():
                raise
            # sglang 0.5.4 ServerArgs.__post_init__ wants a GPU to pick defaults.
            return f"parsed; validation needs a GPU here: {exc}"
        return "ok"

    return parser, check


def vllm_env() -> dict[str, Any]:
    envs = importlib.import_module("vllm.envs")
    names = sorted(envs.environment_variables)
    return {"prefix": "VLLM_", "names": names}


def sglang_env() -> dict[str, Any]:
    names: set[str] = set()
    try:
        sg_envs = importlib.import_module("sglang.srt.environ").envs

        for attr in dir(type(sg_envs)):
            value = getattr(type(sg_envs), attr, None)
            name = getattr(value, "name", None)
            if isinstance(name, str) and name.isupper():
                names.add(name)
            elif attr.isupper() and attr.startswith("SGLANG"):
                names.add(attr)
    except ImportError:
        pass
    return {"prefix": "SGLANG_", "names": sorted(names)}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("engine", choices=["vllm", "sglang"])
    ap.add_argument("--check", help="a JSON file: a list of argv lists (engine args only)")
    opts = ap.parse_args()
    if opts.engine == "vllm":
        parser, check = vllm_parser()
        env = vllm_env()
    else:
        parser, check = sglang_parser()
        env = sglang_env()
    out: dict[str, Any] = {
        "engine": opts.engine,
        "version": importlib.metadata.version(opts.engine),
        "python": sys.version.split()[0],
        **describe(parser),
        "env": env,
        "forced": FORCED,
    }
    if opts.check:
        with open(opts.check, encoding="utf-8") as f:
            cases = json.load(f)
        results = []
        for argv in cases:
            try:
                results.append({"argv": argv, "result": check(argv)})
            except SystemExit as exc:
                results.append({"argv": argv, "result": f"parser exit {exc.code}"})
            except Exception as exc:
                results.append({"argv": argv, "result": f"{type(exc).__name__}: {exc}"})
        out["checked"] = results
    # After a marker: some releases log to stdout while they build the parser.
    sys.stdout.write(f"\n{MARKER}\n")
    json.dump(out, sys.stdout, indent=1, sort_keys=True)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
