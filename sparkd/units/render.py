"""PURE: the configuration -> the text of one systemd unit file per supervised model.

`render_units(config, systemd_version=...)` maps each unit file name
(`sparkd-engine@NAME.service`) to its text. The output is deterministic: the same config and
version give byte-identical files, so the reconciler can compare texts and write only what
changed. Nothing here touches the file system or the clock.

Quoting follows systemd's own parser (systemd.syntax(7), systemd.service(5) "Command lines"):

- every line is first expanded for specifiers, so a literal `%` is written `%%`;
- Exec* command lines then split into words with double quotes and C escapes, and each argument
  is expanded for `$VAR`/`${VAR}`, so a literal `$` is written `$$` (but not in the executable
  path, which systemd never expands);
- Environment= assignments are split the same way but never `$`-expanded.

See docs/units.md for why each setting is what it is.
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Final

from sparkd.config import ACCOUNT_NAME_RE, EXEC_PREFIXES, Config, EngineKind, ModelConfig, Variant
from sparkd.engine.argforms import flag_value
from sparkd.engine.unit import (
    ENGINE_HOST,
    ENGINE_STOPPED_STAMP,
    TIMEOUT_STOP_S,
    health_url,
    start_timeout_s,
)
from sparkd.engine.versions import (
    MOE_BACKEND_ENV,
    MOE_BACKEND_FLAG,
    MOE_ENV_TO_FLAG,
    MOE_FLAG_TO_ENV,
    Resolved,
    moe_policy,
    rules_for,
)
from sparkd.errors import ConfigError

#: A line that marks a unit file as written by sparkd. The reconciler only ever rewrites or
#: removes files that carry it; a file without it is an administrator's and is left alone.
GENERATED_MARKER: Final = "# X-Sparkd-Generated: engine-unit (sparkd rewrites or removes this file)"


#: systemd learned RestartSteps= and RestartMaxDelaySec= in version 254.
RESTART_STEPS_MIN_VERSION: Final = 254


PYTHON_ENGINES: Final[frozenset[EngineKind]] = frozenset({"vllm", "sglang", "sim"})

RESTART_STEPS: Final = 5
RESTART_MAX_DELAY_S: Final = 120
#: The engines' slice (units/sparkd.slice, shipped by the package), a sibling of user.slice:
#: its CPUWeight=/IOWeight= (50) are the engines' static weights against the desktop, and the
#: ones the desktop ladder lowers at runtime (docs/units.md "Resources").
ENGINE_SLICE: Final = "sparkd.slice"
OOM_SCORE_ADJUST: Final = 500

# Characters that need no quoting in a systemd word. Everything else is double-quoted.
_SAFE_CHARS: Final = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_./:=,+@-"
)
# Characters that may not open an executable path: systemd reads them as prefixes, quoted or
# not (v252 src/core/load-fragment.c, config_parse_exec(): the prefix loop runs over the first
# word after extract_first_word() has removed its quotes).
_EXEC_PREFIXES: Final = frozenset(EXEC_PREFIXES)
_C_ESCAPES: Final = {"\\": "\\\\", '"': '\\"', "\n": "\\n", "\t": "\\t", "\r": "\\r"}
# systemd refuses an executable path containing these ("contains special characters").
_BAD_EXEC_CHARS: Final = frozenset("\"'\\")


def is_generated(text: str) -> bool:
    """Whether a unit file's text carries GENERATED_MARKER (on a line of its own)."""
    return GENERATED_MARKER in text.split("\n")


@dataclass(frozen=True, slots=True)
class EngineCommand:
    """What a model's engine runs with, for one engine version: its command line (program
    first) and the environment sparkd adds; `notes` say what was translated or guessed."""

    argv: list[str]
    env: list[tuple[str, str]]  # in Environment= order: sparkd's defaults, then the model's
    resolved: Resolved
    moe_backend: str | None  # the vLLM MoE backend asked for, in --moe-backend words
    notes: list[str]
    defaults: frozenset[str]  # the env keys that are sparkd's own defaults
    #: Where the MoE pin came from: "args" or "env" (the model's own, which always wins),
    #: "sparkd" (sparkd's policy for this release and GPU); None: not a vLLM model.
    moe_from: str | None = None

    @property
    def entrypoint_len(self) -> int:
        """Words before the engine's own arguments: the program and its entrypoint."""
        return 1 + len(self.resolved.rules.entrypoint)


def engine_command(
    config: Config, model: ModelConfig, variant: Variant = "plain", *,
    detected_version: str | None = None, capability: tuple[int, int] | None = None,
) -> EngineCommand:
    """The engine's command line and environment for the version the model's engine runs:
    `models.NAME.engine_version` when pinned, else `detected_version`, else unknown (the
    newest rules, with a warning in `resolved`). `capability` is the GPU's CUDA compute
    capability (None: not known), which decides sparkd's own vLLM MoE pin
    (sparkd.engine.versions.moe_policy). Raises ValueError for external models."""
    if not model.supervised:
        raise ValueError(f"model {model.name!r} is external: sparkd runs no engine for it")
    version = model.engine_version if model.engine_version is not None else detected_version
    resolved = rules_for(model.engine, version)
    rules = resolved.rules
    name, path = model.name, str(model.path)
    listen = ["--host", ENGINE_HOST, "--port", str(model.port_for(variant))]
    own_env = model.env_dict
    notes = [resolved.warning] if resolved.warning else []
    extra: list[str] = []
    drop_env: set[str] = set()
    add_env: list[tuple[str, str]] = []
    moe: str | None = None
    moe_from: str | None = None
    program = _program(model, rules.program, rules.entrypoint)
    if model.engine == "vllm":
        head = [program, *rules.entrypoint, path, "--served-model-name", name]
        moe, extra, add_env, drop_env, moe_notes = _moe_pin(
            f"{config.source}: models.{name}", model, resolved, own_env, capability)
        notes += moe_notes
        moe_from = ("args" if flag_value(model.args, MOE_BACKEND_FLAG) is not None
                    else "env" if MOE_BACKEND_ENV in own_env else "sparkd")
    elif model.engine == "sglang":
        head = [program, *rules.entrypoint, "--model-path", path, "--served-model-name", name]
    elif model.engine == "llamacpp":
        head = [program, "-m", path, "--alias", name]
        if rules.jinja_flag and not {"--jinja", "--no-jinja"} & set(model.args):
            # The default changed between builds (llama.cpp PR 17524): say it explicitly.
            extra = [rules.jinja_flag]
    else:  # sim
        head = [model.binary or str(config.daemon.sparkd_path), "sim-engine", "--model", name,
                "--path", path]
    spec = speculative_args(model, resolved) if variant == "speculative" else []
    env = _environment(model, add_env, drop_env)
    own_keys = set(own_env) - drop_env
    return EngineCommand([*head, *listen, *extra, *model.args, *spec], env, resolved, moe,
                         notes, frozenset(k for k, _ in env if k not in own_keys), moe_from)


def engine_argv(
    config: Config, model: ModelConfig, variant: Variant = "plain", *,
    detected_version: str | None = None,
) -> list[str]:
    """The engine's command line, program first. Raises ValueError for external models."""
    return engine_command(config, model, variant, detected_version=detected_version).argv


def engine_env(
    config: Config, model: ModelConfig, variant: Variant = "plain", *,
    detected_version: str | None = None,
) -> list[tuple[str, str]]:
    """The environment sparkd gives the engine (its defaults, then the model's `env`)."""
    return engine_command(config, model, variant, detected_version=detected_version).env


def _program(model: ModelConfig, default: str, entrypoint: tuple[str, ...]) -> str:
    """The program to run: the model's `binary`, else the version's default. A Python given
    as SGLang's binary runs the `sglang` console script beside it when the version's
    entrypoint is `sglang serve` (and the reverse for `-m sglang.launch_server`)."""
    binary = model.binary
    if binary is None:
        return default
    if model.engine == "sglang":
        base = posixpath.basename(binary)
        folder = posixpath.dirname(binary)
        if entrypoint == ("serve",) and base.startswith("python"):
            return posixpath.join(folder, "sglang") if folder else "sglang"
        if entrypoint != ("serve",) and base == "sglang":
            return posixpath.join(folder, "python3") if folder else "python3"
    return binary


def _moe_pin(
    where: str, model: ModelConfig, resolved: Resolved, own_env: Mapping[str, str],
    capability: tuple[int, int] | None,
) -> tuple[str | None, list[str], list[tuple[str, str]], set[str], list[str]]:
    """vLLM's MoE pin in the form the version reads: (backend asked for, extra arguments,
    environment to add, model env keys to leave out, notes). The model's own pin (args, then
    env) wins; else sparkd's policy for this release and GPU. A variable value no vLLM
    release takes is a ConfigError (one a release takes but not this one: a note, and
    `sparkd check-config` refuses it)."""
    rules = resolved.rules
    version = resolved.version or "of unknown version"
    from_args = flag_value(model.args, MOE_BACKEND_FLAG)
    from_env = own_env.get(MOE_BACKEND_ENV)
    notes: list[str] = []
    if from_args is not None:
        backend: str | None = from_args.lower().replace("-", "_")
        if rules.moe_pin == "env":
            notes.append(f"models.{model.name}.args: {MOE_BACKEND_FLAG} is not a flag of vLLM "
                         f"{version} (it came in 0.17.0): use env.{MOE_BACKEND_ENV}")
        return backend, [], [], set(), notes
    if from_env is not None:
        backend = MOE_ENV_TO_FLAG.get(from_env)
        if backend is None:
            raise ConfigError(
                f"{where}.env.{MOE_BACKEND_ENV}: expected a value of some vLLM release "
                f"({', '.join(MOE_ENV_TO_FLAG)}: which ones this release takes, `sparkd "
                f"check-config` says), got \"{_comment(from_env)}\"; fix: set one, or remove "
                "the key and sparkd pins the backend for this GPU")
        if rules.moe_pin == "env":
            if from_env not in rules.moe_env_values:
                notes.append(f"models.{model.name}.env.{MOE_BACKEND_ENV}={from_env} is not a "
                             f"value vLLM {version} takes (it takes: "
                             f"{', '.join(rules.moe_env_values)})")
            return backend, [], [], set(), notes
        notes.append(f"models.{model.name}.env.{MOE_BACKEND_ENV}={from_env} rendered as "
                     f"{MOE_BACKEND_FLAG} {backend} (vLLM {version} reads the flag"
                     + (")" if rules.moe_env_values else "; the variable is gone since 0.24.0)"))
        return backend, [MOE_BACKEND_FLAG, backend], [], {MOE_BACKEND_ENV}, notes
    backend = moe_policy(rules, capability)
    if rules.moe_pin == "env":
        return backend, [], [(MOE_BACKEND_ENV, MOE_FLAG_TO_ENV[backend])], set(), notes
    return backend, [MOE_BACKEND_FLAG, backend], [], set(), notes


def speculative_args(model: ModelConfig, resolved: Resolved | None = None) -> list[str]:
    """The engine arguments that turn on speculative decoding (FACTS.md: an engine-level
    setting; no engine takes it per request)."""
    s = model.speculative
    if s is None:
        return []
    rules = (resolved or rules_for(model.engine, model.engine_version)).rules
    if model.engine == "vllm":
        config = {"method": s.method, "model": s.draft_model,
                  "num_speculative_tokens": s.num_speculative_tokens}
        return ["--speculative-config", json.dumps(config, separators=(",", ":"))]
    if model.engine == "sglang":
        args = ["--speculative-algorithm", s.method.upper(),
                "--speculative-draft-model-path", s.draft_model]
        for flag, value in (("--speculative-num-steps", s.num_steps),
                            ("--speculative-eagle-topk", s.eagle_topk),
                            ("--speculative-num-draft-tokens", s.num_draft_tokens)):
            if value is not None:
                args += [flag, str(value)]
        return args
    if model.engine == "llamacpp":
        spec_type = rules.spec_types.get(s.method)
        if spec_type is None or not (rules.draft_model_flag and rules.draft_max_flag
                                     and rules.spec_type_flag):
            raise ConfigError(f"models.{model.name}.speculative.method: llama.cpp "
                              f"{rules.since}+ has no {s.method!r} speculative type (it has: "
                              f"{', '.join(rules.spec_types) or 'none'})")
        return [rules.draft_model_flag, s.draft_model, rules.draft_max_flag,
                str(s.num_speculative_tokens), rules.spec_type_flag, spec_type]
    return ["--speculative"]  # the simulated engine


def quote_word(word: str, *, expand_dollar: bool = True) -> str:
    """One word for a systemd command line or Environment= line.

    Words of plain characters are written as they are; any other word is double-quoted, with
    `\\` and `"` escaped, control characters C-escaped, `%` doubled (specifiers) and, when
    `expand_dollar` (Exec* arguments), `$` doubled.
    """
    if "\0" in word:
        raise ValueError("a NUL character cannot be passed through a unit file")
    if word and all(c in _SAFE_CHARS for c in word):
        return word
    out = ['"']
    for c in word:
        if c in _C_ESCAPES:
            out.append(_C_ESCAPES[c])
        elif c == "%":
            out.append("%%")
        elif c == "$" and expand_dollar:
            out.append("$$")
        elif ord(c) < 0x20 or ord(c) == 0x7F:
            out.append(f"\\x{ord(c):02x}")
        else:
            out.append(c)
    out.append('"')
    return "".join(out)


def quote_command(argv: Iterable[str]) -> str:
    """An argv as the value of an Exec*= line (without a prefix such as `+`)."""
    words = list(argv)
    if not words:
        raise ValueError("an empty command line")
    exe = words[0]
    if not exe or exe[0] in _EXEC_PREFIXES:
        # Quoting does not help: `"+python3"` still runs as root.
        raise ValueError(f"an executable {exe!r} that systemd would read as a prefix")
    # The executable path is specifier-expanded but never `$`-expanded.
    first = quote_word(exe, expand_dollar=False)
    return " ".join([first, *(quote_word(w) for w in words[1:])])


def render_units(
    config: Config, *, systemd_version: int, engine_versions: Mapping[str, str] | None = None,
    capability: tuple[int, int] | None = None,
) -> dict[str, str]:
    """File name -> unit text for every supervised model, sorted by file name.

    `engine_versions` maps a model name to the version of its engine found installed
    (sparkd.engine.versions.detect_versions); a version pinned in the config wins.
    `capability`: the GPU's compute capability (sparkd.monitor.nvml.read_compute_capability;
    None: unknown)."""
    versions = engine_versions or {}
    units = {
        m.unit_for(v): render_unit(config, m, systemd_version=systemd_version, variant=v,
                                   detected_version=versions.get(m.name),
                                   capability=capability)
        for m in config.models.values()
        if m.supervised
        for v in m.variants
    }
    return dict(sorted(units.items()))


def render_unit(
    config: Config, model: ModelConfig, *, systemd_version: int, variant: Variant = "plain",
    detected_version: str | None = None, capability: tuple[int, int] | None = None,
) -> str:
    """The text of `sparkd-engine@NAME.service` (or `NAME:spec`, the speculative variant) for
    one supervised model."""
    if not model.supervised:
        raise ValueError(f"model {model.name!r} is external: sparkd renders no unit for it")
    _check_model(config, model)
    command = engine_command(config, model, variant, detected_version=detected_version,
                             capability=capability)
    sparkd = str(config.daemon.sparkd_path)
    name = model.name
    cache = f"sparkd/{name}"
    port = model.port_for(variant)
    unit = model.unit_for(variant)
    argv = command.argv
    start_timeout = start_timeout_s(model.load_timeout_s, config.daemon.settle_timeout_s)
    user = config.daemon.engine_user
    d = config.daemon

    lines = [
        f"# {unit}: the {'speculative ' if variant == 'speculative' else ''}engine of model "
        f"{_comment(name)}.",
        f"# Generated by sparkd from {_comment(str(config.source))}.",
        "# Do not edit: sparkd rewrites this file whenever the configuration changes.",
        "# Put changes in a drop-in instead, which sparkd never touches:",
        f"#   systemctl edit {unit}",
        "# or, for every engine, /etc/systemd/system/sparkd-engine@.service.d/*.conf",
        "# (not `systemctl edit --full`: a full copy in /etc hides this file for good).",
        GENERATED_MARKER,
        *_version_comment(model, command),
        "",
        "[Unit]",
        f"Description=sparkd engine {name} ({model.engine}"
        + (", speculative)" if variant == "speculative" else ")"),
        "# Engines need only loopback; no [Install]: sparkd starts and stops engines itself.",
        "After=network.target",
        f"# At most {d.start_limit_burst} starts in {_number(d.start_limit_interval_s)} s, then "
        "the unit stays failed (a crash",
        "# loop is reported, not retried forever); sparkd rolls back to the last good model.",
        f"StartLimitIntervalSec={_number(d.start_limit_interval_s)}",
        f"StartLimitBurst={d.start_limit_burst}",
        "",
        "[Service]",
        "Type=exec",
        f"User={user}",
        f"Group={user}",
        "SupplementaryGroups=video",
        "# Engines (vLLM, Triton, torch.compile, FlashInfer, HF) write their caches under",
        "# HOME / XDG_CACHE_HOME: a per-model directory in /var/cache that systemd creates",
        "# writable under ProtectSystem=strict.",
        f"CacheDirectory={cache}",
        f"WorkingDirectory=%C/{cache}",
    ]
    # sparkd's defaults are written as they are (HOME holds the %C specifier on purpose);
    # the model's values are quoted so that they reach the engine unchanged.
    lines += [
        f"Environment={k}={v}" if k in command.defaults
        else f"Environment={quote_word(f'{k}={v}', expand_dollar=False)}"
        for k, v in command.env
    ]
    lines += [
        "# As root (+): sync, drop the page cache, wait for memory to settle, and refuse to",
        "# start when the model's memory is not available. It reads the config sparkd accepted,",
        "# never a newer /etc/sparkd.toml that sparkd refused.",
        "ExecStartPre=+"
        + quote_command([sparkd, "prestart", "--config", str(config.daemon.accepted_config),
                         name,
                         *(["--variant", "speculative"] if variant == "speculative" else [])]),
        f"ExecStart={quote_command(argv)}",
        "# The unit turns active only once the engine serves: start means serving.",
        "ExecStartPost="
        + quote_command([sparkd, "wait-healthy", "--url", health_url(port),
                         "--timeout", _number(model.load_timeout_s)])
        # systemd expands $MAINPID here: wait-healthy stops when the engine has died.
        + " --pid $MAINPID",
        "# As root (+), after every stop or crash: note when an engine last stopped; the next",
        "# prestart waits for memory to settle only when one stopped lately (- : never fails).",
        f"ExecStopPost=-+/bin/touch {ENGINE_STOPPED_STAMP}",
        "# The prestart plus the model load.",
        f"TimeoutStartSec={start_timeout}",
        f"TimeoutStopSec={TIMEOUT_STOP_S}",
        "# SIGTERM to the engine, which stops its workers; SIGKILL to what is left at the timeout.",
        "KillMode=mixed",
        "Restart=on-failure",
        f"RestartSec={_number(d.restart_sec)}",
    ]
    if systemd_version >= RESTART_STEPS_MIN_VERSION:
        lines += [
            f"RestartSteps={RESTART_STEPS}",
            f"RestartMaxDelaySec={RESTART_MAX_DELAY_S}",
        ]
    lines += [
        f"LogExtraFields=SPARKD_MODEL={name}",
        *([f"LogExtraFields=SPARKD_VARIANT={variant}"] if variant == "speculative" else []),
        f"SyslogIdentifier=sparkd-engine-{name}" + ("-spec" if variant == "speculative" else ""),
        "",
        "# In sparkd's top-level slice (units/sparkd.slice: CPUWeight=50, IOWeight=50), beside",
        "# user.slice: the engines' share competes with the desktop's at the root.",
        f"Slice={ENGINE_SLICE}",
        "# When memory runs out, the kernel kills the engine before the desktop.",
        f"OOMScoreAdjust={OOM_SCORE_ADJUST}",
        "",
        "# Hardening that keeps the GPU usable. Not PrivateDevices= (it hides the GPU), not",
        "# MemoryDenyWriteExecute= (it breaks the Triton and torch.compile JITs).",
        "DevicePolicy=closed",
        "# Every /proc/devices group named nvidia*: nvidia and nvidiactl (/dev/nvidiaN,",
        "# /dev/nvidiactl), nvidia-uvm, nvidia-caps, nvidia-nvlink, ... Matched when the unit",
        "# starts: the nvidia and nvidia-uvm modules must be loaded by then.",
        "DeviceAllow=char-nvidia* rw",
        "NoNewPrivileges=yes",
        "CapabilityBoundingSet=",
        "ProtectSystem=strict",
        "ProtectHome=read-only",
    ]
    if model.engine == "sim":
        lines += [
            "# The simulated engine creates its synthetic weights in its model path.",
            f"ReadWritePaths={_quote_path('-' + str(model.path))}",
        ]
    lines += [
        "PrivateTmp=yes",
        "PrivateMounts=yes",
        "# The control socket's directory: code an engine runs (a trust_remote_code model) may",
        "# not reach sparkd's control socket (swap, unload, reload). `-`: no error when absent.",
        f"InaccessiblePaths={_quote_path('-' + str(config.daemon.control_socket.parent))}",
        "ProtectKernelTunables=yes",
        "ProtectKernelModules=yes",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
        "ProtectClock=yes",
        "ProtectHostname=yes",
        "ProtectProc=invisible",
        "RestrictNamespaces=yes",
        "LockPersonality=yes",
        "RestrictRealtime=yes",
        "RestrictSUIDSGID=yes",
        "# Removes the engine user's SysV/POSIX shared memory when its last engine stops:",
        "# a crashed engine's /dev/shm segments otherwise keep unified memory in use.",
        "RemoveIPC=yes",
        "UMask=0077",
        "SystemCallArchitectures=native",
        "# Deny only groups no engine needs, EPERM rather than a kill if one ever tries. Not",
        "# @resources (vLLM raises RLIMIT_NOFILE, torch sets affinity and NUMA policy), not",
        "# @debug (torch can share CUDA memory between processes with pidfd_getfd).",
        "SystemCallFilter=~@clock @cpu-emulation @module @mount @obsolete @privileged @raw-io",
        "SystemCallFilter=~@reboot @swap",
        "SystemCallErrorNumber=EPERM",
        "RestrictAddressFamilies=AF_UNIX AF_INET AF_INET6 AF_NETLINK",
    ]
    return "\n".join(lines) + "\n"


#: sparkd's own environment values that hold a specifier on purpose (written unquoted).
_HOME_SPECIFIER: Final = "%C/sparkd/"


def _environment(
    model: ModelConfig, add: list[tuple[str, str]], drop: set[str]
) -> list[tuple[str, str]]:
    """sparkd's defaults (unless the model sets the same key), then the model's env, sorted;
    `add` joins the defaults (the vLLM MoE pin where the version reads a variable), `drop`
    leaves model keys out (a variable the version no longer reads, rendered as a flag)."""
    home = f"{_HOME_SPECIFIER}{model.name}"  # a specifier on purpose: %C is /var/cache
    defaults = [("HOME", home), ("XDG_CACHE_HOME", home)]
    if model.engine in PYTHON_ENGINES:
        defaults.append(("PYTHONUNBUFFERED", "1"))
    defaults += add
    own = model.env_dict
    pairs = [(k, v) for k, v in defaults if k not in own]
    pairs += [(k, v) for k, v in sorted(own.items()) if k not in drop]
    return pairs


def _version_comment(model: ModelConfig, command: EngineCommand) -> list[str]:
    """Header lines saying which engine version the unit was rendered for, and why."""
    r = command.resolved
    if model.engine == "sim":
        return []
    if r.version is None:
        where = "unknown"
    elif model.engine_version is not None:
        where = f"{_comment(r.version)} (pinned: models.{_comment(model.name)}.engine_version)"
    else:
        where = f"{_comment(r.version)} (detected)"
    lines = [f"# Engine: {model.engine} {where}; rendered with the rules for "
             f"{model.engine} {r.rules.since}+ (sparkd/engine/versions.py)."]
    lines += [f"# WARNING: {_comment(n)}" for n in command.notes]
    return lines


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _comment(text: str) -> str:
    """Text safe inside a one-line comment (no line breaks or other control characters)."""
    return "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)


def _quote_path(path: str) -> str:
    # Path settings are unquoted without C escapes: `\` and `"` take a backslash, and the
    # path may hold no control characters (checked in _check_model).
    if all(c in _SAFE_CHARS for c in path):
        return path
    escaped = path.replace("\\", "\\\\").replace('"', '\\"').replace("%", "%%")
    return f'"{escaped}"'


def _check_model(config: Config, model: ModelConfig) -> None:
    """Refuse what systemd could not represent, naming the config key."""
    where = f"{config.source}: models.{model.name}"
    for key, value in (("path", str(model.path)), ("binary", model.binary)):
        if value is not None and any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise ConfigError(f"{where}.{key}: expected no control characters, got {value!r}")
    for i, arg in enumerate(model.args):
        if "\0" in arg:
            raise ConfigError(f"{where}.args[{i}]: a NUL character cannot reach the engine")
    for k, v in model.env:
        if "\0" in v:
            raise ConfigError(f"{where}.env.{k}: a NUL character cannot be in the environment")
    if model.binary is not None:
        _check_executable(f"{where}.binary", model.binary)
    _check_executable(f"{config.source}: daemon.sparkd_path", str(config.daemon.sparkd_path))
    user = config.daemon.engine_user
    if not ACCOUNT_NAME_RE.fullmatch(user) or user == "root":
        raise ConfigError(
            f"{config.source}: daemon.engine_user: expected a plain user name other than root "
            f"(engines never run as root), got {user!r}"
        )


def _check_executable(key: str, value: str) -> None:
    """systemd takes an absolute, normalized path or a bare file name (searched in its PATH)."""
    problem = None
    if not value:
        problem = "a path"
    elif value[0] in _EXEC_PREFIXES:
        problem = f"a program that does not start with one of {EXEC_PREFIXES} (a prefix to systemd)"
    elif any(c in _BAD_EXEC_CHARS or ord(c) < 0x20 or ord(c) == 0x7F for c in value):
        problem = "no quotes, backslashes or control characters (systemd refuses them)"
    elif "/" in value:
        parts = value.split("/")
        if not value.startswith("/") or value.endswith("/") or any(
            p in ("", ".", "..") for p in parts[1:]
        ):
            problem = "an absolute, normalized path or a bare program name"
    elif value in (".", ".."):
        problem = "a program name"
    if problem is not None:
        raise ConfigError(f"{key}: expected {problem}, got {value!r}")
