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
    assert "expected a number >= 0, got true" in err(MINIMAL + "memory_gib = true\n")


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


@pytest.mark.parametrize("version", ["0.34.0", "0.5.23.post1", "11434", "b11434", "v0.11.2"])
def test_engine_version_pin(version: str) -> None:
    config = parse_config(MINIMAL + f'engine_version = "{version}"\n', source=SRC)
    assert config.model("a").engine_version == version
    assert parse_config(MINIMAL, source=SRC).model("a").engine_version is None


@pytest.mark.parametrize("bad", ['"latest"', '"0.34 beta"', "34", '""'])
def test_engine_version_must_be_a_release(bad: str) -> None:
    message = err(MINIMAL + f"engine_version = {bad}\n")
    assert "models.a.engine_version: expected a release of the engine" in message or (
        "models.a.engine_version: expected a string" in message)


def test_engine_version_only_for_real_engines() -> None:
    sim = '[models.a]\nengine = "sim"\nport = 8001\nengine_version = "0.34.0"\n'
    assert "vllm, sglang and llamacpp only" in err(sim)
