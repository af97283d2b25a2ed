from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner

from sparkd.config import load_config, parse_config
from sparkd.errors import ConfigError, UnknownModel
from sparkd.main import cli

SRC = Path("/etc/test.toml")
REPO = Path(__file__).resolve().parents[2]

MINIMAL = """
[models.a]
engine = "vllm"
port = 8001
"""


def err(text: str) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(text, source=SRC)
    return info.value.message


def test_shipped_config_is_valid_and_defines_two_simulated_models() -> None:
    config = load_config(REPO / "etc" / "sparkd.toml")
    sims = [m for m in config.models.values() if m.engine == "sim"]
    assert len(sims) == 2
    assert config.daemon.default_model in config.models
    # Machine state never goes into /etc: the state dir is elsewhere.
    assert not str(config.daemon.state_dir).startswith("/etc")


def test_minimal_config_gets_defaults() -> None:
    c = parse_config(MINIMAL, source=SRC)
    a = c.models["a"]
    assert a.path == Path("/var/lib/sparkd/models/a")
    assert a.unit_name == "sparkd-engine@a.service"
    assert a.args == () and a.env == ()
    assert c.daemon.default_model is None
    assert c.gateway.listen == "127.0.0.1:8000"


def test_wrong_type_names_file_key_expected_and_found() -> None:
    msg = err('[models.qwen]\nengine = "vllm"\nport = "80a"\n')
    assert msg == (
        '/etc/test.toml: models.qwen.port: expected an integer from 1 to 65535, got "80a"'
    )


def test_unknown_key_suggests_the_close_one() -> None:
    msg = err(MINIMAL + "memory_gb = 3\n")
    assert msg.startswith("/etc/test.toml: models.a.memory_gb: unknown key")
    assert 'did you mean "memory_gib"?' in msg


def test_unknown_section_is_an_error() -> None:
    assert 'did you mean "daemon"?' in err("[deamon]\n")


def test_unknown_engine_lists_choices() -> None:
    msg = err('[models.a]\nengine = "vlm"\nport = 1\n')
    assert "models.a.engine: expected one of vllm, sglang, llamacpp, sim, external" in msg
    assert 'did you mean "vllm"?' in msg


def test_invalid_toml_names_the_file() -> None:
    assert err("[daemon\n").startswith("/etc/test.toml: not valid TOML:")


def test_duplicate_ports_are_refused() -> None:
    msg = err(MINIMAL + '[models.b]\nengine = "sglang"\nport = 8001\n')
    assert "models.b.port: expected a port not used by models.a, got 8001" in msg


def test_default_model_must_exist() -> None:
    msg = err('[daemon]\ndefault_model = "aa"\n' + MINIMAL)
    assert 'daemon.default_model: expected the name of a configured model (did you mean "a"?)' in (
        msg
    )


def test_external_needs_url_and_no_port() -> None:
    assert "models.x.url: expected an http://" in err('[models.x]\nengine = "external"\n')
    c = parse_config('[models.x]\nengine = "external"\nurl = "http://10.0.0.2:8000"\n', source=SRC)
    assert not c.models["x"].supervised
    assert c.supervised_models == []


def test_env_values_must_be_strings() -> None:
    assert "models.a.env.X: expected a string, got 1" in err(MINIMAL + "env = { X = 1 }\n")


def test_bad_model_name() -> None:
    assert "models.a b: expected a model name" in err('[models."a b"]\nengine = "vllm"\nport=1\n')


def test_relative_path_refused() -> None:
    assert 'models.a.path: expected an absolute path, got "w"' in err(MINIMAL + 'path = "w"\n')


def test_bool_is_not_a_number() -> None:
    assert "expected a number from 0 to 1048576, got true" in err(MINIMAL + "memory_gib = true\n")


def test_unknown_model_lookup() -> None:
    c = parse_config(MINIMAL, source=SRC)
    with pytest.raises(UnknownModel, match="unknown model 'b'"):
        c.model("b")


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "nope.toml")


def test_check_config_exit_codes(tmp_path: Path) -> None:
    good = tmp_path / "good.toml"
    good.write_text(MINIMAL)
    bad = tmp_path / "bad.toml"
    bad.write_text(MINIMAL + "prot = 1\n")
    runner = CliRunner()
    ok = runner.invoke(cli, ["check-config", "--config", str(good)])
    assert ok.exit_code == 0, ok.output
    res = runner.invoke(cli, ["check-config", "--config", str(bad)])
    assert res.exit_code == 2
    assert f"{bad}: models.a.prot: unknown key" in res.output


def test_check_config_reads_sparkd_config_env(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text("[nope]\n")
    res = CliRunner().invoke(cli, ["check-config"], env={"SPARKD_CONFIG": str(bad)})
    assert res.exit_code == 2
    assert str(bad) in res.output


def test_gateway_and_speculative_keys() -> None:
    c = parse_config(MINIMAL + """
idle_unload_minutes = 30
[models.a.speculative]
method = "eagle3"
draft_model = "/models/eagle3-draft"
num_speculative_tokens = 4
eagle_topk = 8
dispatch = "measured"
routes = { code = "speculative" }
[gateway]
hold_seconds = 5
queue_limit = 3
swap_on_demand = true
allow_remote_images = true
[gateway.classifier]
code_user_agents = ["my-ide"]
""", source=SRC)
    spec = c.models["a"].speculative
    assert spec is not None and spec.method == "eagle3" and spec.eagle_topk == 8
    assert spec.routes_dict == {"structured": "plain", "vision": "speculative",
                                "code": "speculative", "chat": "speculative"}
    assert c.models["a"].idle_unload_minutes == 30
    g = c.gateway
    assert (g.hold_seconds, g.queue_limit, g.swap_on_demand, g.allow_remote_images) == (
        5, 3, True, True)
    assert g.classifier.code_user_agents == ("my-ide",)
    assert g.classifier.code_patterns is None
    d = parse_config(MINIMAL, source=SRC)
    assert d.models["a"].speculative is None and not d.gateway.swap_on_demand


def test_gateway_and_speculative_errors() -> None:
    assert 'models.a.speculative.method: expected one of eagle, eagle3' in err(
        MINIMAL + '[models.a.speculative]\ndraft_model = "d"\n')
    assert 'did you mean "draft_model"' in err(
        MINIMAL + '[models.a.speculative]\nmethod = "eagle"\ndraft_modle = "d"\n')
    assert "models.a.speculative.routes: expected workload classes" in err(
        MINIMAL + '[models.a.speculative]\nmethod = "eagle"\ndraft_model = "d"\n'
        'routes = { json = "plain" }\n')
    assert "gateway.classifier.code_patterns[0]: expected a regular expression" in err(
        MINIMAL + '[gateway.classifier]\ncode_patterns = ["("]\n')
    assert "gateway.queue_limit: expected an integer" in err(
        MINIMAL + '[gateway]\nqueue_limit = "many"\n')


def test_engines_cannot_be_opened_beyond_loopback() -> None:
    assert "models.a.args: expected no --host" in err(MINIMAL + 'args = ["--host", "0.0.0.0"]\n')
    assert "got \"--host=::\"" in err(MINIMAL + 'args = ["--host=::"]\n')


# Issue 10: the smaller holes of the configuration.


@pytest.mark.parametrize("prefix", list("@-:+!|"))
def test_a_binary_starting_with_a_systemd_prefix_is_refused(prefix: str) -> None:
    # Rendered as ExecStart="+python3", systemd reads the `+` as a prefix even quoted: the
    # engine would run as root.
    msg = err(MINIMAL + f'binary = "{prefix}python3"\n')
    assert msg.startswith("/etc/test.toml: models.a.binary: expected a program")
    assert f'got "{prefix}python3"' in msg


@pytest.mark.parametrize(("toml", "key"), [
    ('[models."a\\n"]\nengine = "vllm"\nport = 8001\n', 'models.a\n'),
    (MINIMAL + 'env = { "X\\n" = "1" }\n', "models.a.env"),
    (MINIMAL + 'source = "org/repo\\n"\n', "models.a.source"),
    ('[daemon]\nengine_user = "eng\\n"\n' + MINIMAL, "daemon.engine_user"),
    ('[daemon]\ncontrol_group = "ctl\\n"\n' + MINIMAL, "daemon.control_group"),
])
def test_a_trailing_newline_is_refused(toml: str, key: str) -> None:
    assert f"/etc/test.toml: {key}: expected" in err(toml)


@pytest.mark.parametrize("value", ["inf", "-inf", "nan", "1e300"])
def test_numbers_are_finite_and_bounded(value: str) -> None:
    msg = err(MINIMAL + f"load_timeout_s = {value}\n")
    assert msg.startswith(
        "/etc/test.toml: models.a.load_timeout_s: expected a number from 1 to 604800, got"
    )


@pytest.mark.parametrize("key", [
    "memory_reserve_gib", "health_interval_s", "settle_timeout_s", "last_good_after_s",
    "restart_sec", "start_limit_interval_s", "pressure_warn_pct", "download_stall_timeout_s",
])
def test_every_daemon_number_has_an_upper_bound(key: str) -> None:
    assert f"daemon.{key}: expected a number from " in err(f"[daemon]\n{key} = 1e300\n" + MINIMAL)
    assert f"daemon.{key}: expected a number from " in err(f"[daemon]\n{key} = inf\n" + MINIMAL)


def test_every_model_number_has_an_upper_bound() -> None:
    for key in ("memory_gib", "idle_unload_minutes"):
        assert f"models.a.{key}: expected a number from " in err(MINIMAL + f"{key} = inf\n")
    spec = '[models.a.speculative]\nmethod = "eagle"\ndraft_model = "d"\n'
    for key in ("memory_gib", "recheck_share"):
        assert f"models.a.speculative.{key}: expected a number from " in err(
            MINIMAL + spec + f"{key} = 1e300\n")


def test_check_config_reports_an_infinite_timeout_without_a_traceback(tmp_path: Path) -> None:
    path = tmp_path / "inf.toml"
    path.write_text(MINIMAL + "load_timeout_s = inf\n")
    res = CliRunner().invoke(cli, ["check-config", "--config", str(path)])
    assert res.exit_code == 2, res.output
    assert res.exception is None or isinstance(res.exception, SystemExit)
    assert f"{path}: models.a.load_timeout_s: expected a number from 1 to 604800, got inf" in (
        res.output)


def test_engines_and_the_control_socket_have_different_groups() -> None:
    msg = err('[daemon]\nengine_user = "ops"\ncontrol_group = "ops"\n' + MINIMAL)
    assert msg.startswith("/etc/test.toml: daemon.engine_user: expected a user other than")
    c = parse_config(MINIMAL, source=SRC)
    assert (c.daemon.engine_user, c.daemon.control_group) == ("sparkd-engine", "sparkd")


@pytest.mark.parametrize("path", ["/control.sock", "/run/control.sock", "/var/run/x.sock"])
def test_the_control_socket_lives_in_a_directory_of_its_own(path: str) -> None:
    # Engine units hide the socket's directory (InaccessiblePaths=): never /run itself.
    assert "daemon.control_socket: expected a socket in a directory of its own" in err(
        f'[daemon]\ncontrol_socket = "{path}"\n' + MINIMAL)


def test_minimum_download_rate_default_and_off() -> None:
    assert "daemon.download_min_rate_bytes_per_s: expected an integer from 0 to 1073741824" in (
        err("[daemon]\ndownload_min_rate_bytes_per_s = 1e300\n" + MINIMAL))
    assert parse_config(MINIMAL, source=SRC).daemon.download_min_rate_bytes_per_s == 16384
    c = parse_config("[daemon]\ndownload_min_rate_bytes_per_s = 0\n" + MINIMAL, source=SRC)
    assert c.daemon.download_min_rate_bytes_per_s == 0


def test_an_external_url_has_no_spaces_or_control_characters() -> None:
    assert "models.x.url: expected an http:// or https:// URL" in err(
        '[models.x]\nengine = "external"\nurl = "http://h:1/v1\\n"\n')


def test_every_error_is_listed_not_only_the_first() -> None:
    text = """
[daemon]
default_modle = "a"
[gateway]
hold_seconds = "long"
[models.a]
engine = "sim"
port = 9001
memory_gb = 1
[models.b]
engine = "sim"
port = 9002
[models.c]
engine = "warp"
port = 9003
[models.d]
engine = "sim"
port = 9002
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, source=Path("/etc/sparkd.toml"))
    lines = err.value.message.splitlines()
    assert [line.split(": ")[1] for line in lines] == [
        "daemon.default_modle", "gateway.hold_seconds", "models.a.memory_gb",
        "models.c.engine", "models.d.port"]
    assert all(line.startswith("/etc/sparkd.toml: ") for line in lines)


@pytest.mark.parametrize("version", ["0.34.0", "0.5.23.post1", "0.34.0+cu130", "v0.11.2"])
def test_engine_version_pin(version: str) -> None:
    config = parse_config(MINIMAL + f'engine_version = "{version}"\n', source=SRC)
    assert config.model("a").engine_version == version
    assert parse_config(MINIMAL, source=SRC).model("a").engine_version is None


@pytest.mark.parametrize("bad", ['"latest"', '"0.34 beta"', "34", '""'])
def test_engine_version_must_be_a_release(bad: str) -> None:
    message = err(MINIMAL + f"engine_version = {bad}\n")
    assert "models.a.engine_version: expected a vLLM release as pip shows it" in message or (
        "models.a.engine_version: expected a string" in message)


def test_engine_version_only_for_real_engines() -> None:
    sim = '[models.a]\nengine = "sim"\nport = 8001\nengine_version = "0.34.0"\n'
    assert "vllm, sglang and llamacpp only" in err(sim)


def test_a_huge_value_is_shown_cut_with_its_length() -> None:
    """A 5,000-character engine_version was echoed whole (the second review of issue 9)."""
    text = ('[models.m]\nengine = "vllm"\nport = 8101\npath = "/srv/m"\n'
            f'engine_version = "{"9" * 5000}x"\n')
    with pytest.raises(ConfigError) as exc:
        parse_config(text, source=Path("/c.toml"))
    assert exc.value.message.endswith('... (5001 characters)'), exc.value.message
    assert len(exc.value.message) < 400


def test_a_config_over_a_mib_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    """A 200 MB config of comments was parsed, accepted and copied, and read by every engine
    start (the second review of issue 12): now refused with the file and the fix."""
    from sparkd.config import load_config

    path = tmp_path / "sparkd.toml"
    path.write_text("# padding\n" * 200_000)  # 2 MB of comments: valid TOML
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    assert exc.value.message == (
        f"{path}: larger than 1 MiB: not a sparkd config (a real one is a few KiB); point "
        "--config at the right file, or cut this one down")
    path.write_text("# padding\n" * 1000 + '[models.m]\nengine = "sim"\nport = 8101\n')
    assert list(load_config(path).models) == ["m"]  # a small file reads
