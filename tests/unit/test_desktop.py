"""The desktop ladder: the pure rules on PSI fixtures and lateness readings, desktop presence,
its [daemon] keys, the lateness probe as a real process, and the adapter inside the
Supervisor over a fake systemd."""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import pytest
from fakes import build, run, started

from sparkd.config import parse_config
from sparkd.desktop_config import DesktopConfig
from sparkd.errors import ConfigError
from sparkd.monitor import desktop as dk
from sparkd.monitor.lateness import parse_report, read_report, render, write_report
from sparkd.monitor.psi import Pressure, parse_psi
from sparkd.state import StateStore
from sparkd.systemd.manager import UNSET, ResourceWeights

PSI = Path(__file__).resolve().parents[1] / "fixtures" / "psi"
QUIET = {"cpu": parse_psi((PSI / "cpu.txt").read_text()),
         "memory": parse_psi((PSI / "memory.txt").read_text()),
         "io": parse_psi((PSI / "io.txt").read_text())}
THRASHING = {**QUIET, "memory": parse_psi((PSI / "memory-thrashing.txt").read_text())}
LIMITS = DesktopConfig().limits()  # the defaults: over 10 s -> a step, under 60 s -> restore
VLLM = dk.EngineFacts("big", "vllm", "flashinfer_cutlass")
LATENCY = "flashinfer_trtllm"


def cpu_busy(pct: float) -> dict[str, Pressure]:
    text = (f"some avg10={pct:.2f} avg60=1.00 avg300=1.00 total=1\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=0\n")
    return {**QUIET, "cpu": parse_psi(text)}


def reading(t: float, pressure: dict[str, Pressure] | None = None, late: float | None = 1.0,
            desktop: bool = True,  # noqa: FBT001, FBT002
            engine: dk.EngineFacts | None = VLLM) -> dk.Readings:
    return dk.Readings(t, QUIET if pressure is None else pressure, late, desktop, engine)


def walk(readings: list[dk.Readings], limits: dk.Limits = LIMITS
         ) -> list[dk.Decision]:
    state, out = dk.LadderState(), []
    for r in readings:
        d = dk.decide(state, r, limits, latency_backend=LATENCY)
        state = d.state
        out.append(d)
    return out


# -- the rules --------------------------------------------------------------------------------


def test_quiet_fixtures_are_under_every_default_threshold() -> None:
    assert dk.over(reading(0), LIMITS) == ()


def test_each_signal_over_its_threshold_is_a_reason_with_its_numbers() -> None:
    reasons = dk.over(reading(0, THRASHING, late=35.0), LIMITS)
    assert reasons == (dk.Over("psi.memory.full", 28.5, 10.0),
                       dk.Over("lateness_p99", 35.0, 20.0))
    assert str(reasons[0]) == "psi.memory.full 28.5 % > 10 %"
    assert dk.over(reading(0, cpu_busy(75)), LIMITS) == (dk.Over("psi.cpu.some", 75.0, 50.0),)


def test_a_missing_lateness_report_is_no_reading_not_zero_and_not_over() -> None:
    assert dk.over(reading(0, late=None), LIMITS) == ()


def test_over_for_the_configured_time_climbs_one_step_at_a_time() -> None:
    ds = walk([reading(t, late=40.0) for t in (0, 5, 9.9, 10, 15, 20, 30, 40)])
    assert [d.action for d in ds[:3]] == [dk.Action.NONE] * 3  # not yet 10 s
    assert (ds[3].action, ds[3].step) == (dk.Action.STEP, dk.Step.WEIGHTS)
    assert ds[3].reasons == (dk.Over("lateness_p99", 40.0, 20.0),)
    assert ds[4].action is dk.Action.NONE  # the next step waits another 10 s
    assert (ds[5].action, ds[5].step) == (dk.Action.STEP, dk.Step.LATENCY_MOE)
    assert (ds[6].action, ds[6].step) == (dk.Action.STEP, dk.Step.STOP)
    assert ds[7].action is dk.Action.NONE and ds[7].state.level == 3  # the top: stays


def test_a_dip_under_the_threshold_restarts_the_count() -> None:
    ds = walk([reading(0, late=40), reading(8, late=5), reading(9, late=40),
               reading(18, late=40), reading(19, late=40)])
    assert [d.action for d in ds] == [dk.Action.NONE] * 4 + [dk.Action.STEP]


def test_a_step_that_does_not_apply_is_skipped_with_why() -> None:
    sglang = dk.EngineFacts("s", "sglang", None)
    ds = walk([reading(t, late=40.0, engine=sglang) for t in (0, 10, 20)])
    assert ds[2].step is dk.Step.STOP
    assert ds[2].skipped == (dk.Skipped(dk.Step.LATENCY_MOE, "s is a sglang engine, not vLLM"),)
    on_latency = dk.EngineFacts("v", "vllm", LATENCY)
    assert "already runs the latency MoE backend" in (
        dk.not_applicable(dk.Step.LATENCY_MOE, on_latency, LATENCY) or "")
    dense = dk.EngineFacts("d", "vllm", None)
    assert "names no MoE backend" in (dk.not_applicable(dk.Step.LATENCY_MOE, dense, LATENCY)
                                      or "")


def test_pressure_that_subsides_restores_after_the_configured_time() -> None:
    ds = walk([reading(0, late=40), reading(10, late=40),  # the weights step
               reading(11, late=2), reading(70, late=2), reading(71, late=2)])
    assert ds[1].step is dk.Step.WEIGHTS
    assert ds[3].action is dk.Action.NONE  # 59 s under: not yet
    assert ds[4].action is dk.Action.RESTORE and ds[4].state == dk.LadderState()
    assert "60 s" in ds[4].why


def test_nothing_to_restore_when_no_step_was_taken() -> None:
    ds = walk([reading(t, late=1) for t in range(0, 200, 10)])
    assert {d.action for d in ds} == {dk.Action.NONE}


def test_a_headless_machine_skips_the_ladder() -> None:
    ds = walk([reading(t, THRASHING, late=90, desktop=False) for t in range(0, 60, 5)])
    assert {d.action for d in ds} == {dk.Action.NONE}
    assert ds[-1].why == "headless: no desktop to protect"


def test_a_desktop_that_goes_away_restores_what_the_ladder_did() -> None:
    ds = walk([reading(0, late=40), reading(10, late=40), reading(12, late=40, desktop=False)])
    assert ds[1].step is dk.Step.WEIGHTS
    assert ds[2].action is dk.Action.RESTORE


def test_no_engine_running_is_no_step() -> None:
    ds = walk([reading(t, late=40, engine=None) for t in (0, 10, 20)])
    assert {d.action for d in ds} == {dk.Action.NONE} and ds[-1].why == "no engine running"


def test_an_empty_ladder_never_acts() -> None:
    limits = dk.Limits(psi_pct={}, lateness_p99_ms=20, ladder=())
    ds = walk([reading(t, late=40) for t in (0, 10, 20)], limits)
    assert {d.action for d in ds} == {dk.Action.NONE}


def test_p99_is_the_nearest_rank() -> None:
    assert dk.p99([float(i) for i in range(1, 101)]) == 99.0
    assert dk.p99([5.0]) == 5.0


# -- desktop presence -------------------------------------------------------------------------


def test_presence_from_logind_sessions_and_display_servers() -> None:
    assert dk.desktop_presence(["tty", "wayland"], []).present
    assert dk.desktop_presence(["x11"], None).why == "logind graphical session (x11)"
    assert not dk.desktop_presence(["tty", "unspecified"], []).present
    found = dk.desktop_presence(None, ["python3", "/usr/lib/xorg/Xorg"])
    assert found.present and "Xorg" in found.why
    nothing = dk.desktop_presence(None, None)
    assert not nothing.present and "logind, NVML unread" in nothing.why
    assert dk.desktop_presence(None, None, "present").present
    assert not dk.desktop_presence(["wayland"], ["Xorg"], "absent").present


# -- configuration ----------------------------------------------------------------------------


def parse(daemon: str) -> DesktopConfig:
    return parse_config(f"[daemon]\n{daemon}\n", source=Path("/etc/sparkd.toml")).daemon.desktop


def test_defaults_and_keys() -> None:
    d = parse("")
    assert d == DesktopConfig() and d.presence == "detect"
    assert d.ladder == (dk.Step.WEIGHTS, dk.Step.LATENCY_MOE, dk.Step.STOP)
    custom = parse('desktop_ladder = ["weights", "stop"]\ndesktop_presence = "present"\n'
                   "desktop_psi_cpu_some_pct = 0\ndesktop_psi_io_some_pct = 40\n"
                   "desktop_lateness_p99_ms = 8\ndesktop_cpu_weight = 5")
    assert custom.ladder == (dk.Step.WEIGHTS, dk.Step.STOP)
    assert custom.psi_pct == {("memory", "full"): 10.0, ("io", "full"): 20.0,
                              ("io", "some"): 40.0}
    assert (custom.lateness_p99_ms, custom.cpu_weight) == (8.0, 5)
    assert parse("desktop_ladder = []").ladder == ()


@pytest.mark.parametrize(("line", "message"), [
    ('desktop_ladder = ["weights", "nap"]',
     "/etc/sparkd.toml: daemon.desktop_ladder: expected steps out of ['weights', "
     "'latency_moe', 'stop'], got \"nap\""),
    ('desktop_ladder = "weights"', "daemon.desktop_ladder: expected a list of steps"),
    ('desktop_ladder = ["stop", "stop"]', "daemon.desktop_ladder: expected each step at most"),
    ('desktop_presence = "yes"', "daemon.desktop_presence: expected one of detect, present, "
     "absent"),
    ("desktop_cpu_weight = 0", "daemon.desktop_cpu_weight: expected an integer from 1 to "
     "10000, got 0"),
    ("desktop_psi_cpu_some_pct = 120", "daemon.desktop_psi_cpu_some_pct: expected a number "
     "from 0 to 100"),
    ('desktop_lateness_file = "run/x"', "daemon.desktop_lateness_file: expected an absolute "
     "path"),
    ("desktop_latenes_p99_ms = 5", 'unknown key (did you mean "desktop_lateness_p99_ms"?)'),
])
def test_bad_keys_are_clear_errors(line: str, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse(line)
    assert message in str(err.value)


# -- the lateness probe -----------------------------------------------------------------------


def test_the_probe_process_writes_a_report_sparkd_reads(tmp_path: Path) -> None:
    out = tmp_path / "lateness"
    subprocess.run([sys.executable, "-I", "-c", "import sys; sys.path.insert(0, sys.argv.pop(1)); "
                    "from sparkd.monitor.lateness import main; main()",
                    str(Path(__file__).resolve().parents[2]), "--out", str(out),
                    "--period-ms", "2", "--window-s", "1", "--report-s", "0.01",
                    "--iterations", "50"], check=True, timeout=30)
    report = read_report(out)
    assert report is not None
    assert report.samples == 50 and report.period_ms == 2.0
    assert 0 <= report.p99_ms <= report.max_ms
    assert report.age_s < 5
    assert list(tmp_path.iterdir()) == [out]  # no temporary file left


def test_reports_parse_or_fail_clearly(tmp_path: Path) -> None:
    late = [0.001] * 98 + [0.004, 0.010]
    text = render(late, 0.02, 10).decode()
    report = parse_report(text, 0.5)
    assert (report.p99_ms, report.max_ms, report.samples) == (4.0, 10.0, 100)
    with pytest.raises(ValueError, match="missing or wrong field"):
        parse_report('{"p99_ms": 1}', 0)
    with pytest.raises(ValueError):
        parse_report("garbage", 0)
    assert read_report(tmp_path / "absent") is None
    write_report(tmp_path / "r", text.encode())
    old = read_report(tmp_path / "r", now_wall=(tmp_path / "r").stat().st_mtime + 30)
    assert old is not None and old.age_s == pytest.approx(30)


# -- the adapter in the Supervisor ------------------------------------------------------------

CONFIG = """
[daemon]
default_model = "big"
state_dir = "{state}"
desktop_presence = "{presence}"
desktop_lateness_file = "{lateness}"
desktop_over_s = 10
desktop_restore_s = 30
[models.big]
engine = "vllm"
port = 9002
path = "/m/big"
memory_gib = 1
"""
BIG = "sparkd-engine@big.service"
# Where the weights step acts: the engines' slice, beside user.slice (an engine unit's own
# weight only divides sparkd.slice among engines).
SLICE = "sparkd.slice"


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def test_the_ladder_lowers_weights_stops_and_restores_through_systemd(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lateness = tmp_path / "lateness"
    w = build(tmp_path, CONFIG.replace("{presence}", "present")
              .replace("{lateness}", str(lateness)))
    clock = Clock()
    w.sup.deps.clock = clock
    w.systemd.set("big", "active", "running", pid=42)
    w.systemd.weights[SLICE] = ResourceWeights(cpu_weight=50, io_weight=50,
                                             memory_high=100 << 30)

    def late(ms: float) -> None:
        write_report(lateness, render([ms / 1000] * 100, 0.02, 10))

    async def tick(seconds: float) -> None:
        clock.t += seconds
        await w.sup.watch.ladder.tick(w.sup)
        await w.sup.quiesce()

    async def scenario() -> None:
        await started(w.sup)
        late(45)
        await tick(0)
        await tick(10)  # over for 10 s: the weights
        assert w.systemd.weights[SLICE] == ResourceWeights(1, 1, int((100 << 30) * 0.9))
        late(2)
        await tick(5)
        await tick(29)  # under for 29 s: not yet
        assert w.systemd.weights[SLICE].cpu_weight == 1
        await tick(1)  # 30 s: restored
        assert w.systemd.weights[SLICE] == ResourceWeights(50, 50, 100 << 30)
        late(45)
        for _ in range(4):  # weights, latency_moe (not acted on), stop
            await tick(10)

    with caplog.at_level(logging.INFO):
        run(scenario())
    assert ("stop", BIG) in w.systemd.calls
    assert BIG not in w.systemd.weights  # never the engine unit's own weight
    messages = [r.getMessage() for r in caplog.records if "desktop ladder" in r.getMessage()]
    assert messages[0] == ("desktop ladder: lateness_p99 45.0 ms > 20 ms (over for 10 s); "
                           "sparkd.slice: CPUWeight 50 -> 1, IOWeight 50 -> 1, "
                           f"MemoryHigh {100 << 30} -> {int((100 << 30) * 0.9)}")
    assert "restored" in messages[1]
    assert any("skipped" in m and "names no MoE backend" in m for m in messages)
    assert any("stopping big" in m for m in messages)
    state, _ = StateStore(tmp_path / "state").load()
    assert state.desired_model is None
    assert "desktop ladder" in (state.last_failure_reason or "")


def test_a_headless_machine_never_touches_the_engine(tmp_path: Path) -> None:
    lateness = tmp_path / "lateness"
    w = build(tmp_path, CONFIG.replace("{presence}", "detect")
              .replace("{lateness}", str(lateness)))
    clock = Clock()
    w.sup.deps.clock = clock
    w.systemd.set("big", "active", "running", pid=42)
    write_report(lateness, render([0.2] * 100, 0.02, 10))  # 200 ms late, all the time

    async def scenario() -> None:
        await started(w.sup)
        for _ in range(10):
            clock.t += 10
            await w.sup.watch.ladder.tick(w.sup)
        await w.sup.quiesce()

    run(scenario())
    assert w.sup.watch.ladder.presence is not None
    assert not w.sup.watch.ladder.presence.present  # fake logind: none; no GPU
    assert not w.systemd.weights
    assert ("stop", BIG) not in w.systemd.calls


def test_lowered_never_raises_a_weight() -> None:
    from sparkd.daemon.desktop import lowered
    cfg = DesktopConfig(cpu_weight=10, io_weight=10)
    assert lowered(ResourceWeights(5, UNSET, UNSET), cfg) == ResourceWeights(5, 10, UNSET)


def test_a_systemd_failure_is_said_and_the_health_check_goes_on(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    lateness = tmp_path / "lateness"
    w = build(tmp_path, CONFIG.replace("{presence}", "present")
              .replace("{lateness}", str(lateness)).replace("desktop_over_s = 10",
                                                            "desktop_over_s = 0"))
    w.systemd.set("big", "active", "running", pid=42)
    write_report(lateness, render([0.2] * 100, 0.02, 10))

    def refuse(name: str, weights: ResourceWeights) -> None:
        raise RuntimeError("Access denied")

    w.systemd.set_resource_weights = refuse  # type: ignore[method-assign]

    async def scenario() -> None:
        await started(w.sup)
        await w.sup.check_health()
        await w.sup.check_health()
        await w.sup.quiesce()

    with caplog.at_level(logging.INFO):
        run(scenario())
    failed = [r.getMessage() for r in caplog.records if "desktop ladder: Access" in
              r.getMessage()]
    assert failed == ["desktop ladder: Access denied"]  # said once, not on every tick


def test_a_restarted_sparkd_still_restores_what_the_one_before_lowered(tmp_path: Path) -> None:
    lateness = tmp_path / "lateness"
    text = CONFIG.replace("{presence}", "present").replace("{lateness}", str(lateness))
    first = build(tmp_path, text)
    clock = Clock()
    first.sup.deps.clock = clock
    first.systemd.set("big", "active", "running", pid=42)
    write_report(lateness, render([0.2] * 100, 0.02, 10))

    async def lower() -> None:
        await started(first.sup)
        for _ in range(2):
            await first.sup.watch.ladder.tick(first.sup)
            clock.t += 10
        await first.sup.quiesce()

    run(lower())
    assert first.systemd.weights[SLICE] == ResourceWeights(1, 1, UNSET)
    # A new sparkd (same boot, same units) on the same state directory.
    second = build(tmp_path, text, systemd=first.systemd)
    second.sup.deps.clock = clock
    write_report(lateness, render([0.001] * 100, 0.02, 10))

    async def calm() -> None:
        await started(second.sup)
        for _ in range(5):
            await second.sup.watch.ladder.tick(second.sup)
            clock.t += 10
        await second.sup.quiesce()

    run(calm())
    assert first.systemd.weights[SLICE] == ResourceWeights(50, 50, UNSET)


def test_no_step_while_a_swap_runs(tmp_path: Path) -> None:
    lateness = tmp_path / "lateness"
    w = build(tmp_path, CONFIG.replace("{presence}", "present")
              .replace("{lateness}", str(lateness)))
    clock = Clock()
    w.sup.deps.clock = clock
    w.systemd.set("big", "active", "running", pid=42)
    write_report(lateness, render([0.2] * 100, 0.02, 10))

    async def scenario() -> None:
        await started(w.sup)
        w.sup.swap_run = object()  # type: ignore[assignment]  # a swap in progress
        for _ in range(3):
            await w.sup.watch.ladder.tick(w.sup)
            clock.t += 10
        assert not w.systemd.weights
        w.sup.swap_run = None
        await w.sup.watch.ladder.tick(w.sup)  # over for 30 s already: the step comes now
        await w.sup.quiesce()

    run(scenario())
    assert w.systemd.weights[SLICE].cpu_weight == 1


# -- the latency MoE step ---------------------------------------------------------------------

# vLLM 0.33's line for the backend it chose (sparkd.engine.fingerprints cites it).
CUTLASS_LINE = ("INFO Using 'FLASHINFER_CUTLASS' NvFp4 MoE backend out of potential backends: "
                "['FLASHINFER_TRTLLM', 'FLASHINFER_CUTLASS'].")
LATENCY_CONFIG = CONFIG.replace('memory_gib = 1\n', 'memory_gib = 1\nengine_version = "0.34.0"\n')


def _climb(tmp_path: Path, capability: tuple[int, int] | None,
           caplog: pytest.LogCaptureFixture) -> tuple[object, list[str]]:
    from sparkd.daemon.desktop import DesktopWatch
    from sparkd.engine.fingerprints import match_lines

    lateness = tmp_path / "lateness"
    w = build(tmp_path, LATENCY_CONFIG.replace("{presence}", "present")
              .replace("{lateness}", str(lateness)))
    w.sup.watch.ladder = DesktopWatch(capability=lambda: capability)
    clock = Clock()
    w.sup.deps.clock = clock
    w.systemd.set("big", "active", "running", pid=42)
    write_report(lateness, render([0.045] * 100, 0.02, 10))

    async def scenario() -> None:
        await started(w.sup)
        # What the daemon reads from the engine's start log (adopted here: no start to read).
        w.sup.engines["big"].fingerprints = match_lines([CUTLASS_LINE], engine="vllm")
        for _ in range(3):  # over from the first tick: weights at 10 s, latency_moe at 20 s
            await w.sup.watch.ladder.tick(w.sup)
            await w.sup.quiesce()
            clock.t += 10
            write_report(lateness, render([0.045] * 100, 0.02, 10))

    with caplog.at_level(logging.INFO):
        run(scenario())
    return w, [r.getMessage() for r in caplog.records if "desktop ladder" in r.getMessage()]


def test_the_latency_step_restarts_vllm_with_the_latency_pin_where_its_kernels_run(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """On a 10.x GPU (where vLLM runs the TensorRT-LLM MoE kernels) an engine that chose
    CUTLASS is rendered again with `--moe-backend flashinfer_trtllm` last (vLLM keeps the last
    value) and restarted; before, the step only said it was not done."""
    from sparkd.units.render import render_units

    w, messages = _climb(tmp_path, (10, 0), caplog)
    assert any("restarting it with flashinfer_trtllm" in m for m in messages), messages
    assert ("restart", BIG) in w.systemd.calls  # type: ignore[attr-defined]
    config, _ = w.applied[-1]  # type: ignore[attr-defined]
    assert config.models["big"].args[-2:] == ("--moe-backend", "flashinfer_trtllm")
    unit = render_units(config, systemd_version=252, capability=(10, 0))[BIG]
    exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
    assert exec_start.endswith("--moe-backend flashinfer_trtllm")
    actions = [a.kind for a in w.sup.watch.actions.recent]  # type: ignore[attr-defined]
    assert "desktop_latency_moe" in actions


@pytest.mark.parametrize(("capability", "why"), [
    ((12, 1), "the latency MoE kernels do not run on this GPU (compute capability 12.1; vLLM "
              "runs them only on 10.x): vLLM 0.34.0 refuses that start"),
    ((9, 0), "compute capability 9.0"),
    (None, "the GPU's compute capability could not be read"),
])
def test_the_latency_step_is_skipped_where_vllm_would_refuse_or_fall_back(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, capability: tuple[int, int] | None,
        why: str) -> None:
    """A GB10 (12.1), an H200 (9.0) or an unknown GPU: no restart that vLLM 0.17+ would refuse
    (the engine would be down, not faster); the skip says why."""
    w, messages = _climb(tmp_path, capability, caplog)
    assert not any(c[0] == "restart" for c in w.systemd.calls)  # type: ignore[attr-defined]
    assert any("step latency_moe skipped" in m and why in m for m in messages), messages


def test_a_desktop_nobody_could_look_for_is_unknown_not_headless(tmp_path: Path) -> None:
    """With neither logind nor NVML readable the ladder acts as on a headless machine, but
    status says "unknown": sparkd did not see that there is no desktop."""
    unread = dk.desktop_presence(None, None)
    assert not unread.present and not unread.known
    assert dk.desktop_presence([], None).known  # logind answered: no graphical session
    w = build(tmp_path, CONFIG.replace("{presence}", "detect")
              .replace("{lateness}", str(tmp_path / "lateness")))
    w.sup.watch.ladder.presence = unread
    assert w.sup.watch.desktop == "unknown"
    w.sup.watch.ladder.presence = dk.desktop_presence([], None)
    assert w.sup.watch.desktop == "headless"
