"""`sparkctl doctor`: the runbook's checks, each with what was found and the one-line fix;
exit 1 when any fails.

`gather()` reads the machine (adapters); `diagnose(facts)` is pure and returns the checks, so
every rule is unit-tested on plain values.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import click

from sparkd.config import Config, ModelConfig
from sparkd.control.client import START_HINT
from sparkd.ctl.exits import ExitStatus, run
from sparkd.gateway.rewrite import resolve_policy
from sparkd.monitor.nvml import ComputeCapability
from sparkd.options import config_option, json_option

if TYPE_CHECKING:
    from sparkd.control.status import DaemonRecord, Status
    from sparkd.units.render import EngineCommand

GIB = 1 << 30


class Level(enum.StrEnum):
    OK = "ok"
    WARN = "warn"
    FAIL = "fail"


@dataclass(frozen=True, slots=True)
class Check:
    id: str
    level: Level
    message: str
    fix: str = ""

    def to_json(self) -> dict[str, str]:
        return {"id": self.id, "level": self.level.value, "message": self.message,
                "fix": self.fix}


@dataclass(frozen=True, slots=True)
class Facts:
    """What the checks look at, read by `gather` (or written by a test)."""

    config: Config
    rendered: dict[str, str]  # unit file name -> what sparkd would write
    installed: dict[str, str | None]  # unit file name -> what is in the unit dir (None: none)
    daemon_status: Status | None
    daemon_error: str | None
    drop_caches_writable: bool
    mem_total: int
    path_exists: dict[str, bool] = field(default_factory=dict)
    psi_available: bool = True
    # sparkd-gateway.service's ActiveState and Result (None: no systemd to ask)
    gateway_unit: tuple[str, str] | None = None
    # Why the config file is refused (the checks then ran on the accepted copy)
    file_refused: str | None = None
    # model -> the engine version found installed (sparkd.engine.versions.detect_versions)
    engine_versions: dict[str, str] = field(default_factory=dict)
    # The GPU's CUDA compute capability (decides sparkd's vLLM MoE pin), or why not known
    capability: ComputeCapability = field(
        default_factory=lambda: ComputeCapability(None, "not read"))
    # Why the units could not be rendered from the config (then `rendered` is empty)
    render_error: str | None = None
    # What `sparkd check-config` finds in the engines' command lines (sparkd.engine.linecheck)
    line_errors: list[str] = field(default_factory=list)


def diagnose(f: Facts) -> list[Check]:
    c = f.config
    checks: list[Check] = []
    # What makes sparkd take a config and rewrite its units: a reload while it runs; a
    # start (which reads the file) while it does not.
    apply = "systemctl reload sparkd" if f.daemon_status is not None else START_HINT
    if f.file_refused:
        checks.append(Check("config_file", Level.FAIL,
                            f"the config file is refused (the checks below use the last "
                            f"accepted one, {c.source}): {f.file_refused}",
                            f"fix it (sparkd check-config), then: {apply}"))
    if f.daemon_status is None:
        # The client's reason already says how to start sparkd: said once, as the fix.
        reason = (f.daemon_error or "").split("; why: journalctl", 1)[0]
        checks.append(Check("daemon", Level.FAIL, f"sparkd does not answer: {reason}",
                            f"journalctl -u sparkd -n 50; {START_HINT}"))
    else:
        line = f.daemon_status.daemon.status_line
        checks.append(Check("daemon", Level.OK, f"sparkd runs: {line}"))
        if f.daemon_status.desired_model is None:
            # Nothing serves: after `sparkctl unload`, or a failed start with no last good
            # model to roll back to (last_failure, below, says which).
            default = c.daemon.default_model
            checks.append(Check("serving", Level.WARN, "nothing serves: no model is desired",
                                f"sparkctl swap {default}" if default else
                                "sparkctl swap MODEL (sparkctl models lists them)"))
        reload = f.daemon_status.daemon.last_reload
        if reload and not reload.ok:
            checks.append(Check("config_reload", Level.FAIL,
                                f"the last reload was refused: {reload.message}",
                                "fix /etc/sparkd.toml, then systemctl reload sparkd"))
        d = f.daemon_status.daemon
        if d.config_refused and not f.file_refused:
            checks.append(Check("config_refused", Level.FAIL,
                                "the config file is refused; sparkd runs on the last accepted "
                                f"one ({d.config}): {d.config_refused}",
                                "fix it (sparkd check-config), then: systemctl reload sparkd"))
        for what, unsaved in (("state", d.state_unsaved), ("accepted config", d.config_unsaved)):
            if unsaved:
                checks.append(Check(f"durable.{what.replace(' ', '_')}", Level.FAIL,
                                    f"the {what} is not on disk: {unsaved}",
                                    "free space in the state directory (df -h /var/lib/sparkd)"))
        checks += device_checks(d)
        failure = f.daemon_status.last_failure
        if failure:
            checks.append(Check("last_failure", Level.WARN,
                                f"{failure.model}: {failure.reason}",
                                f"sparkctl logs --model {failure.model}"))
    checks.extend(gateway_checks(f.gateway_unit))
    stale = sorted(n for n, text in f.rendered.items() if f.installed.get(n) != text)
    if f.render_error:
        checks.append(Check("units", Level.FAIL, f"sparkd cannot render the engine units from "
                            f"this config: {f.render_error}",
                            f"sparkd check-config --config {c.source}"))
    elif stale:
        checks.append(Check("units", Level.WARN,
                            f"engine units differ from the config: {', '.join(stale)}",
                            f"{apply} (sparkd rewrites them)"))
    else:
        checks.append(Check("units", Level.OK, f"{len(f.rendered)} engine units match the config"))
    if f.line_errors:
        checks.append(Check("engine_lines", Level.FAIL, "the engines' real parsers refuse: "
                            + "; ".join(e.removeprefix(f"{c.source}: ")
                                        for e in f.line_errors),
                            f"sparkd check-config --config {c.source}"))
    for model in c.supervised_models:
        checks += _engine_checks(f, model)
        need = (model.memory_gib + c.daemon.memory_reserve_gib) * GIB
        if need > f.mem_total:
            checks.append(Check(f"memory.{model.name}", Level.FAIL,
                                f"{model.name} needs {need / GIB:.1f} GiB with the reserve; the "
                                f"machine has {f.mem_total / GIB:.1f} GiB",
                                f"lower models.{model.name}.memory_gib or quantize the model"))
        if model.engine != "sim" and not f.path_exists.get(model.name, False):
            checks.append(Check(
                f"weights.{model.name}", Level.FAIL, f"{model.name}: no weights at {model.path}",
                f"sparkctl pull {model.name}" if model.source else
                f"put the model's files in {model.path} (or point models.{model.name}.path at "
                f'them; with models.{model.name}.source = "ORG/REPO" sparkctl pull fetches '
                "them)"))
        choice = resolve_policy("auto", model.name, model.source, str(model.path))
        if model.role_policy == "passthrough" and choice.policy != "passthrough":
            checks.append(Check(f"role_policy.{model.name}", Level.WARN,
                                f"{model.name} looks like a strict-alternation template "
                                f"({choice.policy}) but role_policy is passthrough",
                                f'role_policy = "auto" in models.{model.name}'))
    checks.append(Check(
        "drop_caches", Level.OK if f.drop_caches_writable else Level.WARN,
        "/proc/sys/vm/drop_caches is writable" if f.drop_caches_writable else
        "/proc/sys/vm/drop_caches is not writable here: prestart falls back to "
        "posix_fadvise on the model's files (other page cache stays)",
        "" if f.drop_caches_writable else "run sparkd as root (the shipped unit does)"))
    if not f.psi_available:
        checks.append(Check("psi", Level.WARN, "/proc/pressure is missing: no memory pressure "
                            "readings", "boot with psi=1"))
    gpu = None if f.daemon_status is None else f.daemon_status.gpu
    if gpu is not None:
        if gpu.error:
            checks.append(Check("nvml", Level.WARN, gpu.error,
                                "install the NVIDIA driver (nvidia-smi must work)"))
        else:
            names = ", ".join(g.name for g in gpu.gpus)
            how = ("unified memory: figures from /proc/meminfo" if gpu.unified_memory
                   else "GPU memory from NVML")
            checks.append(Check("nvml", Level.OK, f"NVML sees {names} ({how})"))
    return checks


def gateway_checks(unit: tuple[str, str] | None) -> list[Check]:
    if unit is None:
        return []
    state, result = unit
    name = "sparkd-gateway.service"
    if state == "active":
        return [Check("gateway", Level.OK, f"{name} is active")]
    if state == "failed":
        why = ("it hit its start limit" if result == "start-limit-hit" else
               f"result {result}")
        return [Check("gateway", Level.FAIL, f"{name} has failed ({why}): nothing answers "
                      "clients", f"journalctl -u {name} -n 50; systemctl reset-failed {name}; "
                      f"systemctl start {name}")]
    return [Check("gateway", Level.FAIL, f"{name} is {state}: nothing answers clients",
                  f"systemctl start {name}")]


def _engine_checks(f: Facts, model: ModelConfig) -> list[Check]:
    """The engine's version (known to sparkd's table or not) and, for vLLM, the MoE pin in
    the form that version reads, whether it can run on this GPU, and what the engine's log
    says it chose."""
    from sparkd.engine.linecheck import outside_fix
    from sparkd.errors import ConfigError
    from sparkd.units.render import engine_command

    if model.engine not in ("vllm", "sglang", "llamacpp"):
        return []
    name = model.name
    detected = f.engine_versions.get(name)
    try:
        command = engine_command(f.config, model, detected_version=detected,
                                 capability=f.capability.value)
    except ConfigError as exc:
        # Said once: by the units check, or by the parsers' check, when they say it.
        if exc.message == f.render_error or any(f"models.{name}." in e for e in f.line_errors):
            return []
        return [Check(f"engine_line.{name}", Level.FAIL, exc.message,
                      f"sparkd check-config --config {f.config.source}")]
    r = command.resolved
    if r.known:
        how = "pinned" if model.engine_version else "detected"
        checks = [Check(f"engine_version.{name}", Level.OK,
                        f"{name}: {model.engine} {r.version} ({how}); rendered with the rules "
                        f"for {model.engine} {r.rules.since}+")]
    else:
        checks = [Check(f"engine_version.{name}", Level.WARN, f"{name}: {r.warning}",
                        outside_fix(model, r.version, detected, f.config.source))]
    if model.engine == "vllm":
        checks += _moe_checks(f, model, command)
    return checks


def _moe_checks(f: Facts, model: ModelConfig, command: EngineCommand) -> list[Check]:
    """The vLLM MoE pin (docs/units.md "The MoE pin"): the model's own pin wins; sparkd's
    is the latency path where it runs and the throughput path where vLLM would refuse it.
    Never advice that another check contradicts."""
    from sparkd.engine.fingerprints import check_moe_backend_json
    from sparkd.engine.versions import (
        DEFAULT_MOE_BACKEND,
        LATENCY_MOE_MAJOR,
        MOE_BACKEND_ENV,
        MOE_FLAG_TO_ENV,
        THROUGHPUT_MOE_BACKEND,
        moe_policy,
        refused_here,
    )

    name, r, cap = model.name, command.resolved, f.capability
    rules = r.rules
    backend = command.moe_backend
    release = f"vLLM {r.version}" if r.known else f"vLLM {rules.since}+ (the rules used)"
    if backend is None:  # a variable value this release does not take (check-config says so)
        form = f"{MOE_BACKEND_ENV}={model.env_dict.get(MOE_BACKEND_ENV)}"
    elif rules.moe_pin == "flag" or command.moe_from == "args":
        form = f"--moe-backend {backend}"
    else:
        form = f"{MOE_BACKEND_ENV}={MOE_FLAG_TO_ENV.get(backend, backend)}"
    whose = {"args": f"models.{name}.args", "env": f"models.{name}.env"}.get(
        command.moe_from or "", "sparkd")
    unread = rules.moe_pin == "env" and (
        command.moe_from == "args"
        or model.env_dict.get(MOE_BACKEND_ENV) not in (None, *rules.moe_env_values))
    message = (f"{name}: MoE pin {form} (set by {whose}; "
               + (f"which {release} does not read)" if unread else f"the form {release} reads)"))
    notes = [n for n in command.notes if n != r.warning]
    if notes:
        message += "; " + "; ".join(notes)
    ours = moe_policy(rules, cap.value)
    gpu = f"compute capability {cap}" if cap.value else "compute capability unknown"
    level, fix = Level.OK, ""
    # A note that only says how the pin was translated is information, the others problems.
    if backend is None or any(" rendered as " not in n for n in notes):
        level, fix = Level.FAIL, f"sparkd check-config --config {f.config.source}"
    elif refused_here(rules, backend, cap.value):
        level = Level.FAIL
        message += (f"; vLLM {r.version or rules.since + '+'} refuses it at start on this GPU "
                    f"({gpu}: the TensorRT-LLM MoE kernels run only on 10.x)")
        fix = (f"remove the pin from {whose} (sparkd then pins --moe-backend "
               f"{THROUGHPUT_MOE_BACKEND} here)")
    elif cap.value is None and rules.moe_refuses and backend == DEFAULT_MOE_BACKEND:
        level = Level.WARN
        message += (f"; the GPU's compute capability could not be read ({cap.error}): "
                    + ("the seed's latency pin, which" if whose == "sparkd" else "this pin")
                    + " vLLM 0.17+ refuses on a GPU other than 10.x")
        fix = "make NVML work (nvidia-smi must answer), then run sparkctl doctor again"
    elif cap.value is None:
        message += f"; the GPU's compute capability could not be read ({cap.error})"
    elif backend == DEFAULT_MOE_BACKEND and cap.value[0] != 10 and not rules.moe_refuses:
        message += (f"; the latency kernels do not run on this GPU ({gpu}): releases before "
                    "0.17 fall back to CUTLASS by themselves (docs/units.md \"The MoE pin\")")
    elif backend == THROUGHPUT_MOE_BACKEND and ours == THROUGHPUT_MOE_BACKEND:
        # The best this GPU and release allow (docs/units.md "The MoE pin"): said, not a
        # warning, since no fix exists for the operator to apply.
        message += (f"; the latency (TensorRT-LLM) MoE kernels do not run on this GPU ({gpu}; "
                    "vLLM runs them only on 10.x), so the throughput path it is: the "
                    "desktop watch guards the desktop (docs/watch.md)")
    elif backend == THROUGHPUT_MOE_BACKEND and ours == DEFAULT_MOE_BACKEND \
            and cap.value[0] == 10:
        level = Level.WARN
        message += f"; the latency path runs on this GPU ({gpu})"
        fix = f"remove the pin from {whose} (sparkd then pins the latency path)"
    checks = [Check(f"moe_backend.{name}", level, message, fix)]
    engines = () if f.daemon_status is None else f.daemon_status.engines
    prints = [fp.to_json() for e in engines if e.model == name for fp in e.fingerprints]
    chosen = check_moe_backend_json(backend, prints)
    fell_back = any(p.get("id") == "moe_latency_fallback" for p in prints) or (
        cap.value is not None and cap.value[0] != LATENCY_MOE_MAJOR)
    if chosen.ok is False and chosen.chosen == THROUGHPUT_MOE_BACKEND and fell_back \
            and backend == DEFAULT_MOE_BACKEND and not rules.moe_refuses:
        # What the moe_backend check above calls expected: a release before 0.17 replaces
        # the latency kernels with CUTLASS by itself where they do not run.
        checks.append(Check(f"moe_chosen.{name}", Level.OK, f"{name}: MoE backend "
                            f"{THROUGHPUT_MOE_BACKEND}: {release} fell back to it from the "
                            f"latency pin by itself on this GPU ({gpu})"))
    elif chosen.ok is not None:
        if chosen.ok:
            chosen_fix = ""
        elif refused_here(rules, backend, cap.value) or backend == ours:
            chosen_fix = f"sparkctl logs --model {name}"
        else:
            chosen_fix = (f"sparkctl logs --model {name}; the pin sparkd would choose here: "
                          f"--moe-backend {ours} (remove the pin from {whose})")
        checks.append(Check(f"moe_chosen.{name}", Level.OK if chosen.ok else Level.FAIL,
                            f"{name}: {chosen.message}", chosen_fix))
    return checks


def gather(config: Config) -> Facts:
    """Read the machine for `diagnose` (no daemon needed; it is asked when it runs)."""
    from sparkd.control import client
    from sparkd.ctl.status import gateway_unit_state
    from sparkd.engine.linecheck import check_lines
    from sparkd.engine.versions import detect_versions
    from sparkd.errors import ConfigError, SparkdError
    from sparkd.monitor.memory import read_meminfo
    from sparkd.monitor.nvml import compute_capability
    from sparkd.systemd.version import installed_systemd_version
    from sparkd.units.render import render_units

    versions = detect_versions(config.supervised_models)
    capability = compute_capability()
    render_error = None
    try:
        rendered = render_units(config, systemd_version=installed_systemd_version(),
                                engine_versions=versions, capability=capability.value)
    except ConfigError as exc:
        rendered, render_error = {}, exc.message
    try:
        line_errors = check_lines(config, versions, capability.value).errors
    except ConfigError as exc:
        line_errors = [exc.message]
    installed: dict[str, str | None] = {}
    for name in rendered:
        try:
            installed[name] = (config.daemon.unit_dir / name).read_text(encoding="utf-8")
        except OSError:
            installed[name] = None
    status: Status | None
    try:
        status, error = client.status(config.daemon.control_socket, timeout_s=5), None
    except SparkdError as exc:
        status, error = None, exc.message
    return Facts(
        config=config,
        rendered=rendered,
        installed=installed,
        daemon_status=status,
        daemon_error=error,
        drop_caches_writable=os.access("/proc/sys/vm/drop_caches", os.W_OK),
        mem_total=read_meminfo().total,
        path_exists={n: m.path.exists() for n, m in config.models.items()},
        psi_available=Path("/proc/pressure/memory").exists(),
        gateway_unit=gateway_unit_state(),
        engine_versions=versions,
        capability=capability,
        render_error=render_error,
        line_errors=line_errors,
    )


_MARK = {"ok": ("ok", "green"), "warn": ("warn", "yellow"), "fail": ("FAIL", "red")}


@click.command()
@config_option
@json_option
@click.pass_context
def doctor(ctx: click.Context, config_file: Path, *, as_json: bool) -> None:
    """Check this machine against the runbook: the daemon, the units, the pinned vLLM MoE
    backend, each model's memory and weights, role policies, drop_caches, NVML.

    Exit 0 when nothing fails (warnings allowed), 1 when a check fails.
    """

    def go() -> None:
        from sparkd.accepted import load_or_fall_back

        loaded = load_or_fall_back(config_file.absolute())
        checks = diagnose(dataclasses.replace(gather(loaded.config),
                                              file_refused=loaded.refused))
        if as_json:
            click.echo(json.dumps([c.to_json() for c in checks], indent=2))
        else:
            for c in checks:
                word, colour = _MARK[c.level.value]
                click.echo(f"{click.style(f'{word:>4}', fg=colour)}  {c.message}")
                if c.fix:
                    click.echo(f"      fix: {c.fix}")
        if any(c.level is Level.FAIL for c in checks):
            ctx.exit(ExitStatus.FAILURE)

    run(ctx, go)


def device_checks(d: DaemonRecord) -> list[Check]:
    """What the udev watch holds (docs/watch.md): the GPU gone, on battery, swaps paused."""
    checks = []
    if d.degraded:
        checks.append(Check("gpu_present", Level.FAIL, f"degraded: {d.degraded}",
                            "nvidia-smi; journalctl -k | grep -i -e nvrm -e xid (sparkd "
                            "starts the model again when the device is bound)"))
    if d.on_battery:
        checks.append(Check("power", Level.WARN, f"on battery: {d.on_battery}",
                            "restore mains; daemon.on_battery says what sparkd does"))
    if d.swaps_paused and not d.degraded and not d.on_battery:
        checks.append(Check("swaps", Level.WARN, d.swaps_paused,
                            "mount the model volume again (findmnt; journalctl "
                            "SPARKD_EVENT=volume_gone)"))
    return checks
