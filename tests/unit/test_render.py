"""Engine unit rendering: golden files, determinism, and systemd quoting round trips.

`UPDATE_GOLDEN=1 pytest tests/unit/test_render.py` rewrites tests/golden/ from the renderer;
review the diff before committing it.
"""

from __future__ import annotations

import os
import string
from dataclasses import replace
from pathlib import Path
from typing import cast

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparkd.config import (
    ENV_NAME_RE,
    MODEL_NAME_RE,
    Config,
    EngineKind,
    ModelConfig,
    parse_config,
)
from sparkd.errors import ConfigError
from sparkd.units.render import (
    ENGINE_SLICE,
    GENERATED_MARKER,
    engine_argv,
    engine_command,
    is_generated,
    quote_command,
    quote_word,
    render_unit,
    render_units,
)

GOLDEN_DIR = Path(__file__).resolve().parent.parent / "golden"
UNITS_DIR = Path(__file__).resolve().parent.parent.parent / "units"
UPDATE = os.environ.get("UPDATE_GOLDEN") == "1"
VERSIONS = (252, 255)

GOLDEN_TOML = r"""
[daemon]
default_model = "qwen3-30b"
engine_user = "sparkd-engine"
settle_timeout_s = 30

[models.qwen3-30b]
engine = "vllm"
engine_version = "0.34.0"
path = "/var/lib/sparkd/models/qwen3-30b"
port = 8201
memory_gib = 70
load_timeout_s = 900
args = ["--gpu-memory-utilization", "0.85", "--max-model-len", "32768"]
env = { HF_HUB_OFFLINE = "1" }
[models.qwen3-30b.speculative]
method = "eagle3"
draft_model = "/var/lib/sparkd/models/qwen3-30b-eagle3"
num_speculative_tokens = 4
memory_gib = 75
port = 8211

[models.gpt-oss-120b]
engine = "vllm"
binary = "/opt/vllm/bin/vllm"
path = "/srv/models/gpt-oss-120b"
port = 8202
load_timeout_s = 1200.5
args = [
  "--speculative-config",
  '{"method": "eagle3", "model": "/srv/models/eagle3", "num_speculative_tokens": 3}',
]
env = { VLLM_FLASHINFER_MOE_BACKEND = "throughput", VLLM_LOGGING_PREFIX = "[gpt-oss 100% $MODEL] " }

[models.mistral-7b]
engine = "sglang"
engine_version = "0.5.23"
binary = "/opt/sglang/bin/python3"
path = "/srv/models/Mistral-7B-Instruct-v0.1"
port = 8203
role_policy = "strict"
args = ["--speculative-algorithm", "EAGLE3", "--mem-fraction-static", "0.8"]

[models.vllm-old]
engine = "vllm"
engine_version = "0.11.2"
path = "/srv/models/Qwen3-30B-A3B"
port = 8205
args = ["--gpu-memory-utilization", "0.85"]

[models.sglang-old]
engine = "sglang"
engine_version = "0.5.4"
path = "/srv/models/Mistral-7B-Instruct-v0.1"
port = 8206

[models."gemma-3-27b.q4"]
engine = "llamacpp"
engine_version = "11434"
path = "/srv/models/gemma 3/gemma-3-27b-Q4_K_M.gguf"
port = 8204
args = ["-ngl", "99", "--ctx-size", "8192"]

[models.sim-small]
engine = "sim"
port = 8101
load_timeout_s = 60
args = ["--load-seconds", "2", "--resident-mib", "128"]

[models.sim-spec]
engine = "sim"
port = 8110
[models.sim-spec.speculative]
method = "eagle"
draft_model = "draft"
port = 8120

[models.remote]
engine = "external"
url = "https://api.example.com/v1"
"""


def golden_config() -> Config:
    return parse_config(GOLDEN_TOML, source=Path("/etc/sparkd.toml"))


# --- a small model of systemd's parser, to check that quoting round-trips -------------------

_SPECIFIERS = {"%": "%", "C": "/var/cache"}
_CESC = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "a": "\a",
         "b": "\b", "f": "\f", "v": "\v", "s": " "}


def expand_specifiers(text: str) -> str:
    out, i = [], 0
    while i < len(text):
        c = text[i]
        if c == "%":
            spec = text[i + 1]
            assert spec in _SPECIFIERS, f"unexpected specifier %{spec} in {text!r}"
            out.append(_SPECIFIERS[spec])
            i += 2
        else:
            out.append(c)
            i += 1
    return "".join(out)


def split_words(text: str, *, cunescape: bool) -> list[str]:
    """systemd's extract_first_word() loop with EXTRACT_UNQUOTE (and CUNESCAPE|RELAX).

    Without cunescape (path settings) a backslash takes the next character as it is.
    """
    words: list[str] = []
    i, n = 0, len(text)
    while True:
        while i < n and text[i] in " \t\n\r":
            i += 1
        if i >= n:
            return words
        word: list[str] = []
        quote: str | None = None
        quoted = False
        while i < n:
            c = text[i]
            if quote is None and c in " \t\n\r":
                break
            if c == "\\":
                nxt = text[i + 1]
                if not cunescape:
                    word.append(nxt)
                    i += 2
                elif nxt == "x":
                    word.append(chr(int(text[i + 2 : i + 4], 16)))
                    i += 4
                elif nxt in _CESC:
                    word.append(_CESC[nxt])
                    i += 2
                else:  # RELAX: an unknown escape stays as written
                    word.append("\\" + nxt)
                    i += 2
            elif quote is None and c in "\"'":
                quote, quoted = c, True
                i += 1
            elif c == quote:
                quote = None
                i += 1
            else:
                word.append(c)
                i += 1
        assert quote is None, f"unterminated quote in {text!r}"
        # An unquoted lone ";" separates commands on an Exec line.
        assert quoted or word != [";"], f"bare ; in {text!r}"
        words.append("".join(word))


def replace_env(word: str) -> str:
    """Exec argument expansion with an empty environment: `$$` -> `$`, no `${...}` left."""
    out, i = [], 0
    while i < len(word):
        if word.startswith("$$", i):
            out.append("$")
            i += 2
        else:
            assert not word.startswith("${", i), f"unescaped variable in {word!r}"
            out.append(word[i])
            i += 1
    return "".join(out)


def parse_exec(value: str) -> list[str]:
    """An Exec*= value (prefixes already stripped) -> (path-as-argv0, args...)."""
    assert value[0] not in "@-:+!|", value
    words = split_words(expand_specifiers(value), cunescape=True)
    return [words[0], *(replace_env(w) for w in words[1:])]


def unit_values(text: str, key: str) -> list[str]:
    return [line.split("=", 1)[1] for line in text.split("\n") if line.startswith(key + "=")]


def parse_environment(text: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for value in unit_values(text, "Environment"):
        for word in split_words(value, cunescape=True):
            k, _, v = expand_specifiers(word).partition("=")
            env[k] = v
    return env


# --- golden files ---------------------------------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_golden(version: int) -> None:
    rendered = render_units(golden_config(), systemd_version=version)
    folder = GOLDEN_DIR / str(version)
    if UPDATE:
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob("*.service"):
            if stale.name not in rendered:
                stale.unlink()
        for name, text in rendered.items():
            (folder / name).write_text(text, encoding="utf-8")
    on_disk = sorted(p.name for p in folder.glob("*.service"))
    assert on_disk == list(rendered), "golden files differ in names: UPDATE_GOLDEN=1 rewrites"
    for name, text in rendered.items():
        expected = (folder / name).read_text(encoding="utf-8")
        assert text == expected, f"{folder / name} differs: UPDATE_GOLDEN=1 rewrites it"


def test_one_unit_per_engine_variant_sorted() -> None:
    units = render_units(golden_config(), systemd_version=255)
    assert list(units) == sorted(units)
    assert set(units) == {
        "sparkd-engine@gemma-3-27b.q4.service",
        "sparkd-engine@gpt-oss-120b.service",
        "sparkd-engine@mistral-7b.service",
        "sparkd-engine@qwen3-30b.service",
        "sparkd-engine@qwen3-30b:spec.service",
        "sparkd-engine@sglang-old.service",
        "sparkd-engine@vllm-old.service",
        "sparkd-engine@sim-small.service",
        "sparkd-engine@sim-spec.service",
        "sparkd-engine@sim-spec:spec.service",
    }
    assert all(is_generated(t) for t in units.values())


def test_external_model_has_no_unit_or_argv() -> None:
    config = golden_config()
    remote = config.model("remote")
    with pytest.raises(ValueError, match="external"):
        render_unit(config, remote, systemd_version=255)
    with pytest.raises(ValueError, match="external"):
        engine_argv(config, remote)


def test_restart_steps_only_from_254() -> None:
    config = golden_config()
    model = config.model("qwen3-30b")
    for version, present in ((252, False), (253, False), (254, True), (255, True)):
        text = render_unit(config, model, systemd_version=version)
        assert ("RestartSteps=5" in text) is present
        assert ("RestartMaxDelaySec=120" in text) is present


def test_engine_argv_per_engine() -> None:
    c = golden_config()
    assert engine_argv(c, c.model("qwen3-30b")) == [
        "vllm", "serve", "/var/lib/sparkd/models/qwen3-30b", "--served-model-name", "qwen3-30b",
        "--host", "127.0.0.1", "--port", "8201", "--moe-backend", "flashinfer_trtllm",
        "--gpu-memory-utilization", "0.85", "--max-model-len", "32768",
    ]
    # SGLang 0.5.23: `sglang serve`, the console script beside the configured Python.
    assert engine_argv(c, c.model("mistral-7b"))[:8] == [
        "/opt/sglang/bin/sglang", "serve",
        "--model-path", "/srv/models/Mistral-7B-Instruct-v0.1",
        "--served-model-name", "mistral-7b", "--host", "127.0.0.1",
    ]
    assert engine_argv(c, c.model("sglang-old"))[:4] == [
        "python3", "-m", "sglang.launch_server", "--model-path"]
    assert engine_argv(c, c.model("gemma-3-27b.q4")) == [
        "llama-server", "-m", "/srv/models/gemma 3/gemma-3-27b-Q4_K_M.gguf", "--alias",
        "gemma-3-27b.q4", "--host", "127.0.0.1", "--port", "8204", "--jinja",
        "-ngl", "99", "--ctx-size", "8192",
    ]
    assert engine_argv(c, c.model("sim-small")) == [
        "/usr/bin/sparkd", "sim-engine", "--model", "sim-small",
        "--path", "/var/lib/sparkd/models/sim-small", "--host", "127.0.0.1", "--port", "8101",
        "--load-seconds", "2", "--resident-mib", "128",
    ]


@pytest.mark.parametrize(
    ("version", "flag", "env"),
    [
        ("0.11.2", None, "latency"),  # only the variable exists
        ("0.16.0", None, "latency"),
        ("0.17.0", "flashinfer_trtllm", None),  # the flag came in 0.17.0 and wins
        ("0.23.0", "flashinfer_trtllm", None),
        ("0.26.0", "flashinfer_trtllm", None),  # the variable is gone (0.24.0)
        ("0.34.0", "flashinfer_trtllm", None),
        ("0.40.1", "flashinfer_trtllm", None),  # newer than known: the newest rules
        ("0.10.0", None, "latency"),  # older than known: the oldest rules
    ],
)
def test_vllm_moe_pin_follows_the_version(version: str, flag: str | None,
                                          env: str | None) -> None:
    c = golden_config()
    model = replace(c.model("vllm-old"), engine_version=version)
    command = engine_command(c, model)
    argv, environment = command.argv, dict(command.env)
    assert (argv[argv.index("--moe-backend") + 1] if "--moe-backend" in argv else None) == flag
    assert environment.get("VLLM_FLASHINFER_MOE_BACKEND") == env
    assert command.moe_backend == "flashinfer_trtllm"
    assert (command.resolved.warning is not None) is (version in ("0.40.1", "0.10.0"))


def test_model_moe_setting_is_translated_for_the_version() -> None:
    c = golden_config()
    base = c.model("gpt-oss-120b")  # env VLLM_FLASHINFER_MOE_BACKEND = "throughput"
    new = engine_command(c, replace(base, engine_version="0.34.0"))
    assert new.argv[new.argv.index("--moe-backend") + 1] == "flashinfer_cutlass"
    assert "VLLM_FLASHINFER_MOE_BACKEND" not in dict(new.env)
    assert any("rendered as --moe-backend flashinfer_cutlass" in n for n in new.notes)
    old = engine_command(c, replace(base, engine_version="0.11.2"))
    assert "--moe-backend" not in old.argv
    assert dict(old.env)["VLLM_FLASHINFER_MOE_BACKEND"] == "throughput"
    assert old.moe_backend == "flashinfer_cutlass"
    # A flag in the model's own args is the model's choice: sparkd adds nothing.
    own = replace(base, engine_version="0.34.0", env=(), args=("--moe-backend", "auto"))
    mine = engine_command(c, own)
    assert mine.argv.count("--moe-backend") == 1 and mine.moe_backend == "auto"
    # ... and on a version without the flag, a note says so.
    too_old = engine_command(c, replace(own, engine_version="0.11.2"))
    assert any("not a flag of vLLM 0.11.2" in n for n in too_old.notes)


def test_llamacpp_speculative_flags_follow_the_build() -> None:
    c = golden_config()
    spec = c.model("qwen3-30b").speculative
    gemma = replace(c.model("gemma-3-27b.q4"), speculative=spec)
    new = engine_argv(c, replace(gemma, engine_version="11434"), "speculative")
    assert new[-6:] == ["--spec-draft-model", "/var/lib/sparkd/models/qwen3-30b-eagle3",
                        "--spec-draft-n-max", "4", "--spec-type", "draft-eagle3"]
    assert "--draft-max" not in new and "--model-draft" not in new
    old = engine_argv(c, replace(gemma, engine_version="9093"), "speculative")
    assert old[-2:] == ["--spec-type", "eagle3"]
    assert spec is not None
    eagle1 = replace(gemma, speculative=replace(spec, method="eagle"))
    with pytest.raises(ConfigError, match="no 'eagle' speculative type"):
        engine_argv(c, eagle1, "speculative")
    # The Jinja default changed between builds: sparkd says it, unless the model does.
    assert "--jinja" in engine_argv(c, gemma)
    no = engine_argv(c, replace(gemma, args=("--no-jinja",)))
    assert "--jinja" not in no and no.count("--no-jinja") == 1


def test_detected_version_is_used_unless_pinned() -> None:
    c = golden_config()
    units = render_units(c, systemd_version=255,
                         engine_versions={"gpt-oss-120b": "0.11.2", "qwen3-30b": "0.11.2"})
    gpt = units["sparkd-engine@gpt-oss-120b.service"]
    assert "# Engine: vllm 0.11.2 (detected)" in gpt
    assert parse_environment(gpt)["VLLM_FLASHINFER_MOE_BACKEND"] == "throughput"
    assert "--moe-backend" not in unit_values(gpt, "ExecStart")[0]
    qwen = units["sparkd-engine@qwen3-30b.service"]  # pinned to 0.34.0: the pin wins
    assert "# Engine: vllm 0.34.0 (pinned: models.qwen3-30b.engine_version)" in qwen
    assert "--moe-backend flashinfer_trtllm" in unit_values(qwen, "ExecStart")[0]
    unknown = render_units(c, systemd_version=255)["sparkd-engine@gpt-oss-120b.service"]
    assert "# WARNING: vllm version unknown" in unknown


def test_environment() -> None:
    c = golden_config()
    units = render_units(c, systemd_version=255)
    qwen = parse_environment(units["sparkd-engine@qwen3-30b.service"])
    assert qwen == {
        "HOME": "/var/cache/sparkd/qwen3-30b",
        "XDG_CACHE_HOME": "/var/cache/sparkd/qwen3-30b",
        "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1",
    }
    old = parse_environment(units["sparkd-engine@vllm-old.service"])
    assert old["VLLM_FLASHINFER_MOE_BACKEND"] == "latency"
    gpt = units["sparkd-engine@gpt-oss-120b.service"]
    assert "VLLM_FLASHINFER_MOE_BACKEND" not in parse_environment(gpt)
    assert parse_environment(gpt)["VLLM_LOGGING_PREFIX"] == "[gpt-oss 100% $MODEL] "
    gemma = parse_environment(units["sparkd-engine@gemma-3-27b.q4.service"])
    assert "PYTHONUNBUFFERED" not in gemma and "VLLM_FLASHINFER_MOE_BACKEND" not in gemma
    assert parse_environment(units["sparkd-engine@sim-small.service"])["PYTHONUNBUFFERED"] == "1"


def test_exec_lines_and_timeouts() -> None:
    c = golden_config()
    text = render_unit(c, c.model("gpt-oss-120b"), systemd_version=252)
    (pre,) = unit_values(text, "ExecStartPre")
    assert pre.startswith("+")
    assert parse_exec(pre[1:]) == [
        "/usr/bin/sparkd", "prestart", "--config", "/var/lib/sparkd/accepted.toml",
        "gpt-oss-120b",
    ]
    (post,) = unit_values(text, "ExecStartPost")
    assert parse_exec(post) == [
        "/usr/bin/sparkd", "wait-healthy", "--url", "http://127.0.0.1:8202/health",
        "--timeout", "1200.5", "--pid", "$MAINPID",
    ]
    (start,) = unit_values(text, "ExecStart")
    assert parse_exec(start) == engine_argv(c, c.model("gpt-oss-120b"))
    assert unit_values(text, "TimeoutStartSec") == ["1261"]  # ceil(1200.5) + 60
    assert "ReadWritePaths" not in text
    sim = render_unit(c, c.model("sim-small"), systemd_version=252)
    assert unit_values(sim, "ReadWritePaths") == ["-/var/lib/sparkd/models/sim-small"]
    assert unit_values(sim, "TimeoutStartSec") == ["120"]


def test_long_settle_timeout_extends_start_timeout() -> None:
    c = parse_config(GOLDEN_TOML.replace("settle_timeout_s = 30", "settle_timeout_s = 120"),
                     source=Path("/etc/sparkd.toml"))
    text = render_unit(c, c.model("sim-small"), systemd_version=252)
    assert unit_values(text, "TimeoutStartSec") == ["210"]  # 60 + 120 + 30


def test_unit_basics() -> None:
    c = golden_config()
    text = render_unit(c, c.model("qwen3-30b"), systemd_version=255)
    lines = text.split("\n")
    assert lines[0].startswith("# sparkd-engine@qwen3-30b.service")
    assert GENERATED_MARKER in lines
    assert "systemctl edit sparkd-engine@qwen3-30b.service" in text
    assert "/etc/sparkd.toml" in lines[1]
    assert "[Install]" not in lines
    settings_ = [line for line in lines if line and not line.startswith("#")]
    assert not [s for s in settings_ if s.startswith(("PrivateDevices", "MemoryDenyWrite"))]
    for line in ("Type=exec", "User=sparkd-engine", "Group=sparkd-engine", "KillMode=mixed",
                 "DevicePolicy=closed", "DeviceAllow=char-nvidia* rw", "CapabilityBoundingSet=",
                 "LogExtraFields=SPARKD_MODEL=qwen3-30b",
                 "SyslogIdentifier=sparkd-engine-qwen3-30b", "CacheDirectory=sparkd/qwen3-30b"):
        assert line in lines, line
    assert text.endswith("\n") and not text.endswith("\n\n")


def test_engines_run_in_the_shipped_top_level_slice_which_holds_the_weights() -> None:
    """Engine units in sparkd.slice, a sibling of user.slice under -.slice: weights divide a
    parent's share among its children, so only there do the engines' weights compete with
    the desktop's (in system.slice/system-sparkd\\x2dengine.slice they divided that slice
    among engines). The static weights are the slice's, none the unit's."""
    c = golden_config()
    for name, text in render_units(c, systemd_version=252).items():
        settings_ = [line for line in text.split("\n") if line and not line.startswith("#")]
        assert f"Slice={ENGINE_SLICE}" in settings_, name
        assert not [s for s in settings_ if s.startswith(("CPUWeight=", "IOWeight="))], name
    assert ENGINE_SLICE.count(".") == 1 and "-" not in ENGINE_SLICE  # top level: no parent
    shipped = (UNITS_DIR / ENGINE_SLICE).read_text().split("\n")
    assert "[Slice]" in shipped and "[Install]" not in shipped
    assert {"CPUWeight=50", "IOWeight=50"} <= set(shipped)


def test_render_is_deterministic() -> None:
    a = render_units(golden_config(), systemd_version=255)
    b = render_units(golden_config(), systemd_version=255)
    assert a == b
    assert [t.encode() for t in a.values()] == [t.encode() for t in b.values()]


def test_header_is_one_comment_per_line_even_for_odd_sources() -> None:
    c = parse_config(GOLDEN_TOML, source=Path("/etc/odd\nname %n.toml"))
    text = render_unit(c, c.model("sim-small"), systemd_version=252)
    header = text.split("\n\n")[0].split("\n")
    assert all(line.startswith("#") for line in header)
    # Prestart reads the accepted copy in the state directory: an odd one round-trips too.
    odd = '[daemon]\nstate_dir = "/var/lib/odd name %n;\\"x\\""\n'
    c = parse_config(GOLDEN_TOML.replace("[daemon]\n", odd, 1), source=Path("/etc/sparkd.toml"))
    (pre,) = unit_values(render_unit(c, c.model("sim-small"), systemd_version=252),
                         "ExecStartPre")
    assert parse_exec(pre[1:])[3] == '/var/lib/odd name %n;"x"/accepted.toml'


@pytest.mark.parametrize(
    ("binary", "problem"),
    [
        ("relative/vllm", "absolute"),
        ("/opt/../vllm", "normalized"),
        ("/opt/vllm/", "normalized"),
        ('/opt/"vllm"', "quotes"),
        ("/opt/vl\\lm", "backslashes"),
        ("/opt/v\nllm", "control"),
    ],
)
def test_bad_binaries_are_config_errors(binary: str, problem: str) -> None:
    toml = GOLDEN_TOML.replace('binary = "/opt/sglang/bin/python3"',
                               f"binary = {_toml_string(binary)}")
    c = parse_config(toml, source=Path("/etc/sparkd.toml"))
    with pytest.raises(ConfigError, match=problem) as info:
        render_units(c, systemd_version=255)
    assert "models.mistral-7b.binary" in info.value.message


@pytest.mark.parametrize("user", ["root", "two words", "%n", "", "sparkd-engine\n"])
def test_engine_user_must_be_plain_and_not_root(user: str) -> None:
    toml = GOLDEN_TOML.replace('engine_user = "sparkd-engine"',
                               f"engine_user = {_toml_string(user)}")
    with pytest.raises(ConfigError, match=r"daemon\.engine_user"):
        parse_config(toml, source=Path("/etc/sparkd.toml"))
    # The renderer refuses such a user too when handed a config built in code.
    c = golden_config()
    bad = replace(c, daemon=replace(c.daemon, engine_user=user))
    with pytest.raises(ConfigError, match=r"daemon\.engine_user"):
        render_units(bad, systemd_version=255)


def test_engine_units_hide_the_control_socket_directory() -> None:
    # Issue 10: code inside an engine could swap, unload and reload through the socket.
    c = golden_config()
    for text in render_units(c, systemd_version=255).values():
        assert "InaccessiblePaths=-/run/sparkd" in text.splitlines()
    moved = replace(c, daemon=replace(c.daemon, control_socket=Path("/run/my ctl/s.sock")))
    unit = render_unit(moved, moved.models["qwen3-30b"], systemd_version=255)
    assert 'InaccessiblePaths="-/run/my ctl"' in unit.splitlines()


@pytest.mark.parametrize("prefix", list("@-:+!|"))
def test_a_binary_with_a_prefix_character_is_refused_by_the_renderer(prefix: str) -> None:
    c = golden_config()
    bad = ModelConfig(name="x", engine="vllm", path=Path("/m"), port=1, binary=f"{prefix}vllm")
    with pytest.raises(ConfigError, match=r"models\.x\.binary: expected a program"):
        render_unit(c, bad, systemd_version=255)


def test_nul_in_args_is_a_config_error() -> None:
    c = golden_config()
    bad = ModelConfig(name="x", engine="vllm", path=Path("/m"), port=1, args=("a\0b",))
    with pytest.raises(ConfigError, match=r"models\.x\.args\[0\]"):
        render_unit(c, bad, systemd_version=255)


def _toml_string(value: str) -> str:
    return '"' + value.encode("unicode_escape").decode().replace('"', '\\"') + '"'


# --- quoting ------------------------------------------------------------------------------


def test_quote_word_examples() -> None:
    assert quote_word("--port") == "--port"
    assert quote_word("") == '""'
    assert quote_word("a b") == '"a b"'
    assert quote_word('{"k": 1}') == '"{\\"k\\": 1}"'
    assert quote_word("100%") == '"100%%"'
    assert quote_word("$HOME") == '"$$HOME"'
    assert quote_word("$HOME", expand_dollar=False) == '"$HOME"'
    assert quote_word("a\\b\n") == '"a\\\\b\\n"'
    assert quote_word(";") == '";"'
    assert quote_word("\x01") == '"\\x01"'


def test_quote_command_refuses_prefix_characters() -> None:
    # systemd reads `"+x"` as the `+` prefix too (issue 10): quoting cannot protect it.
    for exe in ("-weird", "+python3", "@x", ":x", "!x", "|x", ""):
        with pytest.raises(ValueError, match="prefix"):
            quote_command([exe, "x"])
    assert quote_command(["/bin/a$b", "$b"]) == '"/bin/a$b" "$$b"'


# Pieces that mean something to systemd's parser, drawn often; then anything but NUL.
_TOKENS = ["$", "$$", "${X}", "$X", "%", "%n", "%%", "\\", "\\n", '"', "'", ";", " ", "\t",
           "\n", "\r", "\x01", "\x7f", "=", "#", "\u00e9", "\u2028"]
_arg_text = st.lists(
    st.one_of(
        st.sampled_from(_TOKENS),
        st.text(st.characters(blacklist_categories=["Cs"], blacklist_characters="\0"),
                max_size=6),
    ),
    max_size=8,
).map("".join)
_names = st.from_regex(MODEL_NAME_RE, fullmatch=True)
_env_names = st.from_regex(ENV_NAME_RE, fullmatch=True).filter(lambda s: len(s) < 40)
_paths = st.lists(
    st.text(
        st.one_of(
            st.sampled_from(list("$%\\\"' ;-")),
            st.characters(blacklist_categories=["Cs", "Cc"], blacklist_characters="/"),
        ),
        min_size=1,
        max_size=12,
    ).filter(lambda s: s not in (".", "..")),
    min_size=1, max_size=4,
).map(lambda parts: "/" + "/".join(parts))


@settings(max_examples=300, deadline=None)
@given(
    name=_names,
    engine=st.sampled_from(["vllm", "sglang", "llamacpp", "sim"]),
    path=_paths,
    port=st.integers(1, 65535),
    args=st.lists(_arg_text, max_size=8),
    env=st.dictionaries(_env_names, _arg_text, max_size=6),
    version=st.sampled_from([252, 254, 255]),
)
def test_render_never_raises_and_round_trips(
    name: str, engine: str, path: str, port: int, args: list[str], env: dict[str, str],
    version: int,
) -> None:
    config = golden_config()
    model = ModelConfig(
        name=name, engine=cast(EngineKind, engine), path=Path(path), port=port,
        args=tuple(args), env=tuple(sorted(env.items())),
    )
    text = render_unit(config, model, systemd_version=version)
    assert is_generated(text)
    assert text == render_unit(config, model, systemd_version=version)
    # Every physical line is one setting, comment or blank: nothing broke a line.
    for line in text.split("\n"):
        assert line == "" or line.startswith(("#", "[")) or "=" in line, line
        assert not line.endswith("\\"), line
    (start,) = unit_values(text, "ExecStart")
    assert parse_exec(start) == engine_argv(config, model)
    parsed_env = parse_environment(text)
    for k, v in env.items():
        assert parsed_env[k] == v
    if engine == "vllm" and "VLLM_FLASHINFER_MOE_BACKEND" not in env and not any(
            a == "--moe-backend" or a.startswith("--moe-backend=") for a in args):
        # Version unknown: the newest rules, where the pin is the flag.
        argv = parse_exec(start)
        assert argv[argv.index("--moe-backend") + 1] == "flashinfer_trtllm"
        assert "VLLM_FLASHINFER_MOE_BACKEND" not in parsed_env
    if engine == "sim":
        (rw,) = unit_values(text, "ReadWritePaths")
        words = split_words(expand_specifiers(rw), cunescape=False)
        assert words == ["-" + str(Path(path))]


@given(st.lists(_arg_text, min_size=1, max_size=6))
def test_quote_command_round_trips(argv: list[str]) -> None:
    exe = "/usr/bin/" + "".join(c for c in argv[0] if c in string.ascii_letters + "%$ ")
    if exe.endswith("/"):
        exe += "x"
    words = [exe, *argv[1:]]
    assert parse_exec(quote_command(words)) == words


def test_restart_policy_follows_the_daemon_config() -> None:
    base = golden_config()
    daemon = replace(base.daemon, restart_sec=0.5, start_limit_burst=3, start_limit_interval_s=60)
    config = replace(base, daemon=daemon)
    model = next(iter(config.supervised_models))
    text = render_unit(config, model, systemd_version=252)
    assert unit_values(text, "RestartSec") == ["0.5"]
    assert unit_values(text, "StartLimitBurst") == ["3"]
    assert unit_values(text, "StartLimitIntervalSec") == ["60"]


def test_speculative_variant_units() -> None:
    c = golden_config()
    units = render_units(c, systemd_version=252)
    assert "sparkd-engine@qwen3-30b:spec.service" in units
    assert "sparkd-engine@sim-spec:spec.service" in units
    spec = units["sparkd-engine@qwen3-30b:spec.service"]
    (start,) = unit_values(spec, "ExecStart")
    argv = parse_exec(start)
    assert argv[argv.index("--port") + 1] == "8211"
    assert argv[-2:] == ["--speculative-config", '{"method":"eagle3","model":'
                         '"/var/lib/sparkd/models/qwen3-30b-eagle3","num_speculative_tokens":4}']
    (pre,) = unit_values(spec, "ExecStartPre")
    assert parse_exec(pre[1:])[-3:] == ["qwen3-30b", "--variant", "speculative"]
    assert "LogExtraFields=SPARKD_VARIANT=speculative" in spec
    sim = units["sparkd-engine@sim-spec:spec.service"]
    argv = parse_exec(unit_values(sim, "ExecStart")[0])
    assert argv[argv.index("--port") + 1] == "8120" and argv[-1] == "--speculative"
    sglang = replace(c.model("mistral-7b"), speculative=c.model("qwen3-30b").speculative)
    assert engine_argv(c, sglang, "speculative")[-4:] == [
        "--speculative-algorithm", "EAGLE3", "--speculative-draft-model-path",
        "/var/lib/sparkd/models/qwen3-30b-eagle3"]
