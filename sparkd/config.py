"""The configuration: TOML text -> frozen dataclasses.

Pure: `parse_config(text, source=...)` validates and never touches the file system;
`load_config(path)` is the one function that opens the file. Every error names the file, the
dotted key, what was expected and what was found; an unknown key is an error with a
"did you mean" suggestion.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast

from sparkd.config_checks import ACCOUNT_NAME_RE as ACCOUNT_NAME_RE  # re-exported
from sparkd.config_checks import Validator, read_config_text, suggest
from sparkd.config_devices import device_keys
from sparkd.desktop_config import DESKTOP_KEYS, DesktopConfig, parse_desktop
from sparkd.engine.config_rules import check_engine
from sparkd.engine.unit import Variant as Variant  # re-exported: the config speaks of variants
from sparkd.engine.unit import unit_name
from sparkd.errors import ConfigError
from sparkd.metrics_config import parse_metrics_listen
from sparkd.monitor.devices import OnBattery

T = TypeVar("T")

DEFAULT_CONFIG_PATH: Final = Path("/etc/sparkd.toml")
ACCEPTED_CONFIG_FILE: Final = "accepted.toml"
CONFIG_ENV: Final = "SPARKD_CONFIG"

EngineKind = Literal["vllm", "sglang", "llamacpp", "sim", "external"]
ENGINE_KINDS: Final[tuple[EngineKind, ...]] = ("vllm", "sglang", "llamacpp", "sim", "external")
RolePolicy = Literal["passthrough", "merge", "strict", "strict-tools", "auto"]
ROLE_POLICIES: Final[tuple[RolePolicy, ...]] = ("passthrough", "merge", "strict",
                                                 "strict-tools", "auto")

SpeculativeMethod = Literal["eagle", "eagle3"]
SPECULATIVE_METHODS: Final[tuple[SpeculativeMethod, ...]] = ("eagle", "eagle3")
DispatchMode = Literal["static", "measured"]
DISPATCH_MODES: Final[tuple[DispatchMode, ...]] = ("static", "measured")
VARIANTS: Final[tuple[Variant, ...]] = ("plain", "speculative")
WORKLOADS: Final = ("structured", "vision", "code", "chat")
# Speculation loses on grammar-constrained output (JSON, tool calls) and on code (the seed's
# fifth disaster): those go to the plain engine, the rest to the speculative one.
DEFAULT_DISPATCH_ROUTES: Final[tuple[tuple[str, Variant], ...]] = (
    ("structured", "plain"),
    ("vision", "speculative"),
    ("code", "plain"),
    ("chat", "speculative"),
)

# Every pattern here is used with fullmatch(): `$` would also accept a trailing newline, which
# then ends up in a unit file (an extra line) or a journal field.
# Model names become systemd instance names and journal field values: keep them plain.
MODEL_NAME_RE: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
ENV_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
# A Hub repository: "hf://ORG/REPO", or the bare id "ORG/REPO" (sparkd.store.hub).
SOURCE_RE: Final = re.compile(r"(hf://)?[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*")
# An external model's URL: http(s), no whitespace or control characters.
URL_RE: Final = re.compile(r"https?://[^\x00-\x20\x7f]+")
# Characters systemd reads as prefixes of an Exec*= command (systemd.service(5), "Command
# lines": @ - : + ! !!; newer releases add |), quoted or not: `+python3` runs as root.
EXEC_PREFIXES: Final = "@-:+!|"
# Directories engine units cannot hide (InaccessiblePaths=) without breaking themselves: the
# control socket must live in a directory of its own below them.
SHARED_DIRS: Final = frozenset({"/", "/run", "/var/run", "/var", "/tmp", "/var/tmp", "/dev",
                                "/dev/shm"})
#: The largest number any key takes unless its own range says less.
DAY_S: Final = 86400.0
WEEK_S: Final = 7 * DAY_S
MEMORY_MAX_GIB: Final = 1048576.0  # 1 PiB: far above any one machine, far below overflow
# An engine release: vLLM/SGLang "0.34.0", "0.5.23.post1"; a llama.cpp build "11434"/"b11434".


@dataclass(frozen=True, slots=True)
class DaemonConfig:
    unit_dir: Path = Path("/run/systemd/system")
    state_dir: Path = Path("/var/lib/sparkd")
    control_socket: Path = Path("/run/sparkd/control.sock")
    # Members may use the control socket. Never the engine user's group: code an engine runs
    # (a model's trust_remote_code) must not be able to swap, unload or reload (issue 10).
    control_group: str = "sparkd"
    default_model: str | None = None
    stop_engines_on_exit: bool = False
    memory_reserve_gib: float = 4.0
    sparkd_path: Path = Path("/usr/bin/sparkd")
    engine_user: str = "sparkd-engine"
    health_interval_s: float = 5.0
    settle_timeout_s: float = 30.0
    # An engine whose process lives but whose health fails this many checks in a row is hung:
    # sparkd restarts it through systemd.
    hung_after_failures: int = 3
    # A swapped-in model becomes the "last good" one (the rollback target) after this long
    # healthy.
    last_good_after_s: float = 60.0
    # Engine restart policy, rendered into every engine unit.
    restart_sec: float = 5.0
    start_limit_burst: int = 5
    start_limit_interval_s: float = 600.0
    # Memory pressure (PSI `full` avg10, percent of time every task stalled) above which the
    # desktop is starving: sparkd says so (event `desktop_pressure`, sparkctl status).
    pressure_warn_pct: float = 10.0
    metrics_listen: str = ""  # Prometheus metrics, HOST:PORT on loopback ("": off)
    # sparkd.store (issue 4): files fetched at once, seconds without a byte before a transfer
    # counts as stalled, tries per file before a pull gives up on it.
    download_concurrency: int = 4
    download_stall_timeout_s: float = 30.0
    download_attempts: int = 8
    # A transfer slower than this over a stall window (download_stall_timeout_s) is dropped
    # and tried again: a server trickling a byte a second never stalls (0: no floor).
    download_min_rate_bytes_per_s: int = 16384
    # Watching the machine (issue 13, docs/watch.md). The memory floor: MemAvailable under
    # memory_floor_gib for memory_floor_samples readings in a row, one every
    # memory_floor_interval_s, stops the engine that grows (0 GiB: off).
    memory_floor_gib: float = 4.0
    memory_floor_samples: int = 2
    memory_floor_interval_s: float = 0.1
    # Liveness beyond /health: one window of /metrics and NVML readings per liveness_window_s;
    # liveness_strikes hung windows in a row restart the engine (0: off).
    liveness_window_s: float = 30.0
    liveness_strikes: int = 3
    # Where the machine has no GPU (a CPU engine; the simulated engine in tests), nothing can
    # corroborate a stall: true lets the stall alone count as a strike.
    liveness_without_gpu: bool = False
    # udev (docs/watch.md): on battery this long, "stop" the engines cleanly (or "ignore").
    on_battery: OnBattery = "stop"
    on_battery_grace_s: float = 30.0
    desktop: DesktopConfig = field(default_factory=DesktopConfig)  # desktop_* keys

    @property
    def accepted_config(self) -> Path:
        """Where sparkd keeps the config it accepted (sparkd.accepted): what engine units'
        prestart and a boot with a refused /etc/sparkd.toml read."""
        return self.state_dir / ACCEPTED_CONFIG_FILE


@dataclass(frozen=True, slots=True)
class ClassifierConfig:
    """Overrides of the workload classifier's code rules (None: the built-in lists)."""

    code_user_agents: tuple[str, ...] | None = None
    code_system_prompts: tuple[str, ...] | None = None
    code_patterns: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    listen: str = "127.0.0.1:8000"
    hold_seconds: float = 120.0
    queue_limit: int = 256
    swap_on_demand: bool = False
    swap_min_interval_s: float = 300.0
    # 8 MiB: reading, passing on and relaying a body costs the event loop a few copies of it
    # (measured: at 32 MiB a 63 ms stretch of the loop, at 8 MiB 36 ms, on a loaded 2-core
    # machine; /health must answer within 50 ms). 8 MiB of base64 is a 6 MB image.
    max_body_bytes: int = 8 * 1024 * 1024
    # Caps on the gateway's work per request (sparkd/gateway/limits.py): messages, content
    # parts and tool calls (400 past them), characters of text the classifier reads.
    max_messages: int = 4096
    max_parts: int = 16384
    classifier_chars: int = 64 * 1024
    allow_remote_images: bool = False
    upstream_timeout_s: float = 600.0
    classifier: ClassifierConfig = field(default_factory=ClassifierConfig)
    # The door (issue 10, docs/gateway.md "The door"): who may come in, under which names,
    # and how long and how much a connection may hold. Parsed by _parse_gateway_door.
    keys_file: Path | None = None
    allowed_hosts: tuple[str, ...] = ()
    max_connections: int = 4096
    header_timeout_s: float = 10.0
    body_timeout_s: float = 60.0
    idle_timeout_s: float = 60.0
    body_memory_bytes: int = 64 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class SpeculativeConfig:
    """A second engine variant with speculative decoding (EAGLE/EAGLE3), and how the gateway
    splits traffic between it and the plain variant."""

    method: SpeculativeMethod
    draft_model: str
    num_speculative_tokens: int = 3
    # SGLang's knobs (vLLM takes num_speculative_tokens only).
    num_steps: int | None = None
    eagle_topk: int | None = None
    num_draft_tokens: int | None = None
    port: int | None = None  # the speculative variant's port (None: the model's port + 1)
    # What the speculative variant needs to start (None: the model's memory_gib): the weights
    # again, and the draft model.
    memory_gib: float | None = None
    dispatch: DispatchMode = "static"
    routes: tuple[tuple[str, Variant], ...] = DEFAULT_DISPATCH_ROUTES
    min_samples: int = 20
    recheck_share: float = 0.05

    @property
    def routes_dict(self) -> dict[str, Variant]:
        return dict(self.routes)


@dataclass(frozen=True, slots=True)
class ModelConfig:
    name: str
    engine: EngineKind
    path: Path
    port: int
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    memory_gib: float = 0.0
    load_timeout_s: float = 900.0
    binary: str | None = None
    url: str | None = None
    role_policy: RolePolicy = "passthrough"
    source: str | None = None
    revision: str | None = None
    speculative: SpeculativeConfig | None = None
    idle_unload_minutes: float | None = None
    # sparkd.store (issue 4): glob patterns of the repository's files to fetch (empty: all),
    # and whether a bad file found before a start is fetched again instead of refusing it.
    files: tuple[str, ...] = ()
    repair: bool = False
    # The engine's version, pinned (None: detected from the installed engine). Picks the
    # flags and environment sparkd renders (sparkd.engine.versions).
    engine_version: str | None = None

    @property
    def unit_name(self) -> str:
        return unit_name(self.name)

    @property
    def variants(self) -> tuple[Variant, ...]:
        """The engine variants sparkd runs for this model: plain, and speculative when the
        model has `speculative` settings."""
        return ("plain", "speculative") if self.speculative is not None else ("plain",)

    def unit_for(self, variant: Variant) -> str:
        return unit_name(self.name, variant)

    def port_for(self, variant: Variant) -> int:
        if variant == "plain" or self.speculative is None:
            return self.port
        return self.speculative.port or self.port + 1

    def memory_gib_for(self, variant: Variant) -> float:
        if variant == "plain" or self.speculative is None:
            return self.memory_gib
        return self.speculative.memory_gib if self.speculative.memory_gib is not None else (
            self.memory_gib)

    @property
    def supervised(self) -> bool:
        """Whether sparkd runs this model's engine (external models are only routed)."""
        return self.engine != "external"

    @property
    def env_dict(self) -> dict[str, str]:
        return dict(self.env)


@dataclass(frozen=True, slots=True)
class Config:
    source: Path
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    gateway: GatewayConfig = field(default_factory=GatewayConfig)
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    # The text this config was parsed from: what sparkd keeps as the accepted config.
    text: str = field(default="", compare=False, repr=False)

    def model(self, name: str) -> ModelConfig:
        from sparkd.errors import UnknownModel

        try:
            return self.models[name]
        except KeyError:
            known = ", ".join(sorted(self.models)) or "none"
            raise UnknownModel(
                f"unknown model {name!r} (configured in {self.source}: {known})"
            ) from None

    @property
    def supervised_models(self) -> list[ModelConfig]:
        return [m for m in self.models.values() if m.supervised]


def config_path(explicit: str | os.PathLike[str] | None = None) -> Path:
    """The config path: an explicit one, else $SPARKD_CONFIG, else /etc/sparkd.toml."""
    if explicit is not None:
        return Path(explicit)
    env = os.environ.get(CONFIG_ENV)
    return Path(env) if env else DEFAULT_CONFIG_PATH


def load_config(path: Path) -> Config:
    # Absolute: the rendered units pass this path to `sparkd prestart --config`.
    path = path.absolute()
    return parse_config(read_config_text(path, CONFIG_ENV), source=path)


def parse_config(text: str, *, source: Path) -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: not valid TOML: {exc}") from None
    v = Validator(source)
    # Every error, not the first: each section and each model is checked on its own, and
    # the error lists them all (one line each, each naming file, key and fix).
    errors: list[str] = []

    def checked(check: Callable[[], T], fallback: T) -> T:
        try:
            return check()
        except ConfigError as exc:
            errors.append(exc.message)
            return fallback

    checked(lambda: v.known_keys(raw, "", ("daemon", "gateway", "models")), None)
    daemon = checked(lambda: _parse_daemon(v, v.table(raw, "daemon")), DaemonConfig())
    gateway = checked(lambda: _parse_gateway(v, v.table(raw, "gateway")), GatewayConfig())
    no_models: dict[str, Any] = {}
    models_raw = checked(lambda: v.table(raw, "models"), no_models)
    models: dict[str, ModelConfig] = {}
    broken: set[str] = set()
    ports: dict[int, str] = {}
    for name, table in models_raw.items():
        try:
            model = _parse_named_model(v, name, table, daemon, ports)
        except ConfigError as exc:
            errors.append(exc.message)
            broken.add(name)
            continue
        models[name] = model
    default = daemon.default_model
    if default is not None and default not in broken:
        if default not in models:
            checked(lambda: v.fail("daemon.default_model", "the name of a configured model"
                                   + suggest(default, list(models)), default), None)
        elif not models[default].supervised:
            checked(lambda: v.fail("daemon.default_model",
                                   'a model sparkd runs (not engine = "external")', default),
                    None)
    if errors:
        raise ConfigError("\n".join(errors))
    return Config(source=source, daemon=daemon, gateway=gateway, models=models, text=text)


def _parse_named_model(v: Validator, name: str, table: Any, daemon: DaemonConfig,
                       ports: dict[int, str]) -> ModelConfig:
    """One model's section, its ports checked against (and added to) those taken."""
    key = f"models.{name}"
    if not MODEL_NAME_RE.fullmatch(name):
        v.fail(key, "a model name of letters, digits, '_', '.' or '-' (at most 64, "
               "starting with a letter or digit)", name)
    if not isinstance(table, dict):
        v.fail(key, "a table", table)
    model = _parse_model(v, name, table, daemon)
    if model.supervised:
        for variant in model.variants:
            port = model.port_for(variant)
            where = f"{key}.port" if variant == "plain" else f"{key}.speculative.port"
            if port in ports:
                v.fail(where, f"a port not used by {ports[port]}", port)
            ports[port] = key + ("" if variant == "plain" else " (speculative)")
    return model


_DAEMON_KEYS: Final = (*(k for k in DaemonConfig.__dataclass_fields__ if k != "desktop"),
                       *DESKTOP_KEYS)
_GATEWAY_KEYS: Final = tuple(GatewayConfig.__dataclass_fields__)
_MODEL_KEYS: Final = tuple(k for k in ModelConfig.__dataclass_fields__ if k != "name")
_CLASSIFIER_KEYS: Final = tuple(ClassifierConfig.__dataclass_fields__)
_SPECULATIVE_KEYS: Final = tuple(SpeculativeConfig.__dataclass_fields__)


def _parse_daemon(v: Validator, t: dict[str, Any]) -> DaemonConfig:
    v.known_keys(t, "daemon", _DAEMON_KEYS)
    d = DaemonConfig()
    control_socket = v.abspath(t, "daemon.control_socket", d.control_socket)
    if str(control_socket.parent) in SHARED_DIRS:
        v.fail("daemon.control_socket", "a socket in a directory of its own, such as "
               "/run/sparkd/control.sock (engine units hide that directory)", str(control_socket))
    control_group = v.account(t, "daemon.control_group", d.control_group, "group")
    engine_user = v.account(t, "daemon.engine_user", d.engine_user, "user")
    if engine_user == "root":
        v.fail("daemon.engine_user", "a user other than root (engines never run as root)",
               engine_user)
    if engine_user == control_group:
        # The engine's own group would open the control socket to the engine (issue 10).
        v.fail("daemon.engine_user", f"a user other than the control group {control_group!r} "
               "(engines may not use the control socket)", engine_user)
    return DaemonConfig(
        unit_dir=v.abspath(t, "daemon.unit_dir", d.unit_dir),
        state_dir=v.abspath(t, "daemon.state_dir", d.state_dir),
        control_socket=control_socket,
        control_group=control_group,
        default_model=v.opt_string(t, "daemon.default_model"),
        stop_engines_on_exit=v.boolean(t, "daemon.stop_engines_on_exit", d.stop_engines_on_exit),
        memory_reserve_gib=v.number(t, "daemon.memory_reserve_gib", d.memory_reserve_gib, lo=0,
                                    hi=MEMORY_MAX_GIB),
        sparkd_path=v.abspath(t, "daemon.sparkd_path", d.sparkd_path),
        engine_user=engine_user,
        health_interval_s=v.number(t, "daemon.health_interval_s", d.health_interval_s, lo=0.1,
                                   hi=3600),
        settle_timeout_s=v.number(t, "daemon.settle_timeout_s", d.settle_timeout_s, lo=0,
                                  hi=3600),
        hung_after_failures=v.integer(
            t, "daemon.hung_after_failures", d.hung_after_failures, lo=1, hi=1000
        ),
        last_good_after_s=v.number(t, "daemon.last_good_after_s", d.last_good_after_s, lo=0,
                                   hi=DAY_S),
        restart_sec=v.number(t, "daemon.restart_sec", d.restart_sec, lo=0.1, hi=3600),
        start_limit_burst=v.integer(
            t, "daemon.start_limit_burst", d.start_limit_burst, lo=1, hi=1000
        ),
        start_limit_interval_s=v.number(
            t, "daemon.start_limit_interval_s", d.start_limit_interval_s, lo=1, hi=DAY_S
        ),
        pressure_warn_pct=v.number(t, "daemon.pressure_warn_pct", d.pressure_warn_pct, lo=0,
                                   hi=100),
        metrics_listen=parse_metrics_listen(v, t, d.metrics_listen),
        download_concurrency=v.integer(
            t, "daemon.download_concurrency", d.download_concurrency, lo=1, hi=64
        ),
        download_stall_timeout_s=v.number(
            t, "daemon.download_stall_timeout_s", d.download_stall_timeout_s, lo=0.1, hi=3600
        ),
        download_attempts=v.integer(
            t, "daemon.download_attempts", d.download_attempts, lo=1, hi=100
        ),
        download_min_rate_bytes_per_s=v.integer(
            t, "daemon.download_min_rate_bytes_per_s", d.download_min_rate_bytes_per_s, lo=0,
            hi=1 << 30,
        ),
        memory_floor_gib=v.number(t, "daemon.memory_floor_gib", d.memory_floor_gib, lo=0,
                                  hi=MEMORY_MAX_GIB),
        memory_floor_samples=v.integer(t, "daemon.memory_floor_samples",
                                       d.memory_floor_samples, lo=1, hi=100),
        memory_floor_interval_s=v.number(t, "daemon.memory_floor_interval_s",
                                         d.memory_floor_interval_s, lo=0.02, hi=10),
        liveness_window_s=v.number(t, "daemon.liveness_window_s", d.liveness_window_s, lo=1,
                                   hi=3600),
        liveness_strikes=v.integer(t, "daemon.liveness_strikes", d.liveness_strikes, lo=0,
                                   hi=100),
        liveness_without_gpu=v.boolean(t, "daemon.liveness_without_gpu",
                                       d.liveness_without_gpu),
        **device_keys(v, t, d),
        desktop=parse_desktop(v, t),
    )


def _parse_gateway(v: Validator, t: dict[str, Any]) -> GatewayConfig:
    v.known_keys(t, "gateway", _GATEWAY_KEYS)
    d = GatewayConfig()
    listen = v.string(t, "gateway.listen", d.listen)
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        v.fail("gateway.listen", 'HOST:PORT such as "127.0.0.1:8000"', listen)
    c = v.table(t, "gateway.classifier")
    v.known_keys(c, "gateway.classifier", _CLASSIFIER_KEYS)
    patterns = v.opt_strings(c, "gateway.classifier.code_patterns")
    for i, pattern in enumerate(patterns or ()):
        try:
            re.compile(pattern)
        except re.error as exc:
            v.fail(f"gateway.classifier.code_patterns[{i}]", f"a regular expression ({exc})",
                   pattern)
    return GatewayConfig(
        listen=listen,
        hold_seconds=v.number(t, "gateway.hold_seconds", d.hold_seconds, lo=0),
        queue_limit=v.integer(t, "gateway.queue_limit", d.queue_limit, lo=0, hi=1_000_000),
        swap_on_demand=v.boolean(t, "gateway.swap_on_demand", d.swap_on_demand),
        swap_min_interval_s=v.number(
            t, "gateway.swap_min_interval_s", d.swap_min_interval_s, lo=0
        ),
        max_body_bytes=v.integer(
            t, "gateway.max_body_bytes", d.max_body_bytes, lo=1024, hi=1 << 31
        ),
        max_messages=v.integer(t, "gateway.max_messages", d.max_messages, lo=1, hi=1_000_000),
        max_parts=v.integer(t, "gateway.max_parts", d.max_parts, lo=1, hi=1_000_000),
        classifier_chars=v.integer(
            t, "gateway.classifier_chars", d.classifier_chars, lo=0, hi=16 * 1024 * 1024
        ),
        allow_remote_images=v.boolean(t, "gateway.allow_remote_images", d.allow_remote_images),
        upstream_timeout_s=v.number(t, "gateway.upstream_timeout_s", d.upstream_timeout_s, lo=1),
        classifier=ClassifierConfig(
            code_user_agents=v.opt_strings(c, "gateway.classifier.code_user_agents"),
            code_system_prompts=v.opt_strings(c, "gateway.classifier.code_system_prompts"),
            code_patterns=patterns,
        ),
        **_parse_gateway_door(v, t, listen),
    )


HOST_NAME_RE: Final = re.compile(
    r"^[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?(\.[a-z0-9]([a-z0-9-]{0,62}[a-z0-9])?)*\Z")
DOOR_TIMEOUT_MAX_S: Final = 3600.0


def listen_is_loopback(listen: str) -> bool:
    """Whether gateway.listen is reachable from this machine only (127.0.0.0/8, ::1,
    localhost)."""
    import ipaddress

    host = listen.rpartition(":")[0].strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _without_userinfo(url: str | None) -> str | None:
    """A URL as an error may show it: credentials in it (user:password@) are not."""
    return None if url is None else re.sub(r"^([^/]*//)[^/@]*@", r"\1***@", url)


def _seconds(v: Validator, t: dict[str, Any], key: str, default: float) -> float:
    value = v.number(t, key, default, lo=0.5)
    if not value <= DOOR_TIMEOUT_MAX_S:  # also NaN
        v.fail(key, f"a number of seconds from 0.5 to {DOOR_TIMEOUT_MAX_S:g}", value)
    return value


def _parse_gateway_door(v: Validator, t: dict[str, Any], listen: str) -> dict[str, Any]:
    """The [gateway] keys of the door (issue 10), kept together."""
    d = GatewayConfig()
    keys_file = v.opt_string(t, "gateway.keys_file")
    if keys_file is not None and not keys_file.startswith("/"):
        v.fail("gateway.keys_file", "an absolute path", keys_file)
    if keys_file is None and not listen_is_loopback(listen):
        raise ConfigError(
            f"{v.source}: gateway.listen: {listen!r} is reachable from other machines, and"
            " no API keys are configured: set gateway.keys_file (create a key with"
            " `sparkd gateway-key add NAME`; docs/gateway.md, \"API keys\"), or listen on"
            ' "127.0.0.1:PORT"')
    hosts = v.opt_strings(t, "gateway.allowed_hosts") or ()
    for i, name in enumerate(hosts):
        if not HOST_NAME_RE.match(name.lower().rstrip(".")):
            v.fail(f"gateway.allowed_hosts[{i}]", "a host name such as \"spark.lan\"", name)
    max_body = v.integer(t, "gateway.max_body_bytes", d.max_body_bytes, lo=1024, hi=1 << 31)
    memory = v.integer(t, "gateway.body_memory_bytes", d.body_memory_bytes,
                       lo=1024, hi=1 << 34)
    if memory < max_body:
        v.fail("gateway.body_memory_bytes", f"at least gateway.max_body_bytes ({max_body})",
               memory)
    return {
        "keys_file": None if keys_file is None else Path(keys_file),
        "allowed_hosts": tuple(h.lower().rstrip(".") for h in hosts),
        "max_connections": v.integer(t, "gateway.max_connections", d.max_connections,
                                     lo=16, hi=1_000_000),
        **{key: _seconds(v, t, f"gateway.{key}", getattr(d, key))
           for key in ("header_timeout_s", "body_timeout_s", "idle_timeout_s")},
        "body_memory_bytes": memory,
    }


def _parse_speculative(v: Validator, key: str, t: dict[str, Any]) -> SpeculativeConfig:
    v.known_keys(t, key, _SPECULATIVE_KEYS)
    for required in ("method", "draft_model"):
        if required not in t:
            what = "one of " + ", ".join(SPECULATIVE_METHODS) if required == "method" else (
                "the draft model (a path or a Hugging Face id)")
            v.fail(f"{key}.{required}", what, "nothing")

    def opt_int(name: str) -> int | None:
        return None if name not in t else v.integer(t, f"{key}.{name}", 0, lo=1, hi=64)

    routes = dict(DEFAULT_DISPATCH_ROUTES)
    routes_raw = v.table(t, f"{key}.routes")
    for workload in routes_raw:
        if workload not in WORKLOADS:
            v.fail(f"{key}.routes", "workload classes among " + ", ".join(WORKLOADS)
                   + suggest(workload, list(WORKLOADS)), workload)
        routes[workload] = cast(
            Variant, v.choice(routes_raw, f"{key}.routes.{workload}", VARIANTS, "plain")
        )
    d = SpeculativeConfig(method="eagle", draft_model="")
    spec_port = None if "port" not in t else v.integer(t, f"{key}.port", 0, lo=1, hi=65535)
    return SpeculativeConfig(
        method=cast(SpeculativeMethod, v.choice(t, f"{key}.method", SPECULATIVE_METHODS, "")),
        draft_model=v.string(t, f"{key}.draft_model", ""),
        num_speculative_tokens=v.integer(
            t, f"{key}.num_speculative_tokens", d.num_speculative_tokens, lo=1, hi=64
        ),
        num_steps=opt_int("num_steps"),
        eagle_topk=opt_int("eagle_topk"),
        num_draft_tokens=opt_int("num_draft_tokens"),
        port=spec_port,
        memory_gib=None if "memory_gib" not in t else v.number(t, f"{key}.memory_gib", 0.0,
                                                                lo=0, hi=MEMORY_MAX_GIB),
        dispatch=cast(DispatchMode, v.choice(t, f"{key}.dispatch", DISPATCH_MODES, "static")),
        routes=tuple((w, routes[w]) for w in WORKLOADS),
        min_samples=v.integer(t, f"{key}.min_samples", d.min_samples, lo=1, hi=100_000),
        recheck_share=v.number(t, f"{key}.recheck_share", d.recheck_share, lo=0, hi=0.5),
    )


def _parse_model(v: Validator, name: str, t: dict[str, Any], daemon: DaemonConfig) -> ModelConfig:
    key = f"models.{name}"
    v.known_keys(t, key, _MODEL_KEYS)
    if "engine" not in t:
        v.fail(f"{key}.engine", "one of " + ", ".join(ENGINE_KINDS), "nothing")
    engine = cast(EngineKind, v.choice(t, f"{key}.engine", ENGINE_KINDS, "vllm"))
    url = v.opt_string(t, f"{key}.url")
    if engine == "external":
        if url is None or not URL_RE.fullmatch(url):
            v.fail(f"{key}.url", "an http:// or https:// URL (external models need one)",
                   _without_userinfo(url))
    elif url is not None:
        v.fail(f"{key}.url", 'no url (only engine = "external" models have one)',
               _without_userinfo(url))
    if engine != "external" and "port" not in t:
        v.fail(f"{key}.port", "an integer from 1 to 65535", "nothing")
    port = v.integer(t, f"{key}.port", 0, lo=1 if engine != "external" else 0, hi=65535)
    env_table = v.table(t, f"{key}.env", path=f"{key}.env")
    env: list[tuple[str, str]] = []
    for env_key, env_val in sorted(env_table.items()):
        if not ENV_NAME_RE.fullmatch(env_key):
            v.fail(f"{key}.env", "environment variable names like NAME_1", env_key)
        if not isinstance(env_val, str):
            v.fail(f"{key}.env.{env_key}", "a string", env_val)
        env.append((env_key, env_val))
    args = t.get("args", [])
    if not isinstance(args, list) or not all(isinstance(a, str) for a in args):
        v.fail(f"{key}.args", "a list of strings", args)
    for a in args:
        if len(a.split("=")[0]) > 3 and "--host".startswith(a.split("=")[0]):  # --hos too
            # Engines listen on loopback only: the gateway is the one door.
            v.fail(f"{key}.args", "no --host (engines listen on 127.0.0.1 only; clients use"
                   " the gateway)", a)
        if len(a.split("=")[0]) > 3 and "--port".startswith(a.split("=")[0]):
            # The engines keep the last --port (argparse takes --por as --port): the health
            # gate would wait on `port`.
            v.fail(f"{key}.args", f"no --port (set {key}.port instead: sparkd passes it and "
                   "checks the engine's health there)", a)
    speculative = None
    if "speculative" in t:
        if engine not in ("vllm", "sglang", "llamacpp", "sim"):
            v.fail(f"{key}.speculative", "no speculative table (sparkd runs no engine for an "
                   "external model)", engine)
        speculative = _parse_speculative(
            v, f"{key}.speculative", v.table(t, f"{key}.speculative")
        )
    idle = None
    if "idle_unload_minutes" in t:
        if engine == "external":
            v.fail(f"{key}.idle_unload_minutes", "nothing for an external model", t[
                "idle_unload_minutes"])
        idle = v.number(t, f"{key}.idle_unload_minutes", 0.0, lo=0.1, hi=WEEK_S / 60)
    files = t.get("files", [])
    if not isinstance(files, list) or not all(isinstance(f, str) and f for f in files):
        v.fail(f"{key}.files", 'a list of glob patterns such as ["*.safetensors", "*.json"]',
               files)
    source = v.opt_string(t, f"{key}.source")
    binary = v.opt_string(t, f"{key}.binary")
    if binary is not None and (not binary or binary[0] in EXEC_PREFIXES):
        # systemd takes a leading @ - : + ! | of ExecStart= as a prefix, quotes or not.
        v.fail(f"{key}.binary", "a program name or absolute path that does not start with "
               f"one of {EXEC_PREFIXES} (systemd reads those as command prefixes)", binary)
    if source is not None and not SOURCE_RE.fullmatch(source):
        v.fail(f"{key}.source", 'a Hugging Face repository as "hf://ORG/REPO" (or "ORG/REPO")',
               source)
    engine_version = v.opt_string(t, f"{key}.engine_version")
    check_engine(v, key, engine, engine_version, dict(env),
                 speculative.method if speculative else None, args)
    return ModelConfig(
        name=name,
        engine=engine,
        path=v.abspath(t, f"{key}.path", daemon.state_dir / "models" / name),
        port=port,
        args=tuple(args),
        env=tuple(env),
        memory_gib=v.number(t, f"{key}.memory_gib", 0.0, lo=0, hi=MEMORY_MAX_GIB),
        load_timeout_s=v.number(t, f"{key}.load_timeout_s", 900.0, lo=1, hi=WEEK_S),
        binary=binary,
        url=url,
        role_policy=cast(
            RolePolicy, v.choice(t, f"{key}.role_policy", ROLE_POLICIES, "passthrough")
        ),
        source=source,
        revision=v.opt_string(t, f"{key}.revision"),
        speculative=speculative,
        idle_unload_minutes=idle,
        files=tuple(files),
        repair=v.boolean(t, f"{key}.repair", False),  # noqa: FBT003
        engine_version=engine_version,
    )
