"""How the engines read the words of a model's `args`, and what sparkd then says (review of
issue 9, each test failing on the code before its fix):

- llama-server looks each word up whole and reads `--a_b` as `--a-b` (b9093 and b11434
  common/arg.cpp): `--ctx-size=4096` exits 1 ("error: invalid argument"), `--ctx_size 4096`
  runs. tests/integration/test_llama_argv_real.py holds the check against the real server.
- vLLM's FlexibleArgumentParser reads `--a_b` as `--a-b`; argparse keeps the last value of a
  repeated flag: the MoE pin the engine runs with is the last `--moe-backend`, in either
  spelling.
- A release with a PEP 440 epoch (`1!0.1`) is newer than every release without one.
- `--port` in args would move the engine away from the port sparkd's health gate asks.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import tomli_w
from click.testing import CliRunner

from sparkd.config import parse_config
from sparkd.engine.parsers import check_argv, fixture
from sparkd.engine.versions import rules_for
from sparkd.errors import ConfigError
from sparkd.main import cli as sparkd_cli
from sparkd.units.render import engine_command


def config_text(model: dict[str, Any]) -> str:
    return tomli_w.dumps({"models": {"m": {"engine": "vllm", "port": 8201, "path": "/m/m",
                                           **model}}})


def check_config(tmp_path: Path, model: dict[str, Any]) -> tuple[int, str]:
    cfg = tmp_path / "c.toml"
    cfg.write_text(config_text(model))
    res = CliRunner().invoke(sparkd_cli, ["check-config", "--config", str(cfg)])
    return res.exit_code, res.output.replace(f"{cfg}: ", "")


@pytest.mark.parametrize("version", ["9093", "11434"])
def test_llama_cpp_words_are_read_as_llama_server_reads_them(version: str) -> None:
    fx = fixture("llamacpp", version)
    assert check_argv(fx, ["--ctx_size", "4096", "--no_jinja"]) == []
    assert check_argv(fx, ["--ctx-size=4096"]) == [
        "--ctx-size=4096: llama-server takes no --flag=value form (it exits with 'error: "
        "invalid argument: --ctx-size=4096')"]
    assert check_argv(fx, ["--draft_max", "4"]) == [f"--draft-max: removed in llamacpp {version}"]


def test_check_config_says_how_to_write_a_llama_cpp_flag(tmp_path: Path) -> None:
    code, out = check_config(tmp_path, {"engine": "llamacpp", "engine_version": "b11434",
                                        "args": ["--ctx-size=4096", "--draft_max", "4"]})
    assert code == 2
    assert out.splitlines() == [
        "models.m.args: --ctx-size=4096: llama-server takes no --flag=value form (it exits "
        "with 'error: invalid argument: --ctx-size=4096'); fix: write it as two words in "
        'models.m.args: "--ctx-size", "4096"',
        "models.m.args: --draft-max: removed in llamacpp 11434; fix: use --spec-draft-n-max "
        "instead"]


def test_vllm_reads_underscores_as_dashes(tmp_path: Path) -> None:
    assert check_argv(fixture("vllm", "0.34.0"), ["serve", "/m", "--max_model_len", "4096"]) \
        == []
    code, out = check_config(tmp_path, {"engine_version": "0.34.0",
                                        "args": ["--max_model_len", "lots"]})
    assert code == 2 and out.startswith(
        "models.m.args: --max-model-len 'lots': not a value of type"), out


@pytest.mark.parametrize("args", [
    ("--moe-backend", "flashinfer_trtllm", "--moe-backend", "flashinfer_cutlass"),
    ("--moe-backend=flashinfer_trtllm", "--moe-backend=flashinfer_cutlass"),
    ("--moe_backend", "flashinfer_cutlass"),
    ("--moe-backend", "flashinfer_trtllm", "--moe_backend=flashinfer_cutlass"),
])
def test_the_moe_pin_is_the_one_the_engine_keeps(args: tuple[str, ...]) -> None:
    config = parse_config(config_text({"engine_version": "0.34.0", "args": list(args)}),
                          source=Path("/c.toml"))
    command = engine_command(config, config.model("m"), capability=(12, 1))
    assert (command.moe_backend, command.moe_from) == ("flashinfer_cutlass", "args")
    # sparkd adds no pin of its own in front of the model's.
    assert command.argv.count("--moe-backend") == list(args).count("--moe-backend")


def test_an_epoch_is_newer_than_every_known_release() -> None:
    resolved = rules_for("vllm", "1!0.1")
    assert not resolved.known
    assert resolved.warning is not None and "newer than the newest release" in resolved.warning


@pytest.mark.parametrize("engine", ["vllm", "sglang", "llamacpp", "sim"])
@pytest.mark.parametrize("args", [["--port", "9999"], ["--port=9999"]])
def test_port_in_args_is_refused(engine: str, args: list[str]) -> None:
    with pytest.raises(ConfigError) as exc:
        parse_config(config_text({"engine": engine, "args": args}), source=Path("/c.toml"))
    assert "/c.toml: models.m.args: expected no --port (set models.m.port instead" in \
        exc.value.message


def test_a_llama_cpp_speculative_method_it_lacks_is_refused_with_the_file() -> None:
    """Before: accepted by the config, then a render error without the file's name (and
    doctor's units and engine_lines checks said it twice)."""
    text = config_text({"engine": "llamacpp", "engine_version": "9093",
                        "speculative": {"method": "eagle", "draft_model": "/m/d.gguf"}})
    with pytest.raises(ConfigError) as exc:
        parse_config(text, source=Path("/c.toml"))
    assert exc.value.message == (
        '/c.toml: models.m.speculative.method: expected "eagle3" (llama.cpp speculates with '
        'EAGLE3 only: common/speculative.cpp), got "eagle"')
    parse_config(text.replace('"eagle"', '"eagle3"'), source=Path("/c.toml"))


@pytest.mark.parametrize(("line", "backend"), [
    ("INFO [modelopt.py:1] Using FlashInfer CUTLASS kernels", "flashinfer_cutlass"),
    ("INFO [modelopt.py:1] Using FlashInfer TensorRT-LLM kernels", "flashinfer_trtllm"),
    ("INFO Using FlashInfer FP8 MoE CUTLASS backend for SM90/SM100", "flashinfer_cutlass"),
    ("INFO Using FlashInfer FP8 MoE TRTLLM backend for SM100", "flashinfer_trtllm"),
    ("INFO Using FLASHINFER_TRTLLM NvFp4 MoE backend out of potential backends: [x].",
     "flashinfer_trtllm"),
    ("INFO Using 'FLASHINFER_CUTLASS' NvFp4 MoE backend out of potential backends: [x].",
     "flashinfer_cutlass"),
])
def test_doctor_reads_the_chosen_backend_as_the_daemon_does(line: str, backend: str) -> None:
    """Doctor compares the pin with the fingerprints sparkctl status carries (their id, value
    and line); before, vLLM 0.11's 'CUTLASS' was read with another fingerprint's words and
    doctor failed a matching pin ("the pin asks for flashinfer_cutlass, the engine chose
    cutlass")."""
    from sparkd.daemon.report import fingerprint_record
    from sparkd.engine.fingerprints import check_moe_backend, check_moe_backend_json, match_lines

    matches = match_lines([line], engine="vllm")
    assert [m.backend for m in matches] == [backend]
    records = [fingerprint_record(m).to_json() for m in matches]
    assert check_moe_backend_json(backend, records) == check_moe_backend(backend, matches)
    assert check_moe_backend_json(backend, records).ok is True


@pytest.mark.parametrize(("engine", "word"), [
    ("vllm", "--served-model-name"), ("vllm", "--served_model_name=x"), ("vllm", "--model"),
    ("sglang", "--model-path"), ("sglang", "--model"), ("sglang", "--served-model-name"),
    ("llamacpp", "-m"), ("llamacpp", "--model"), ("llamacpp", "--alias"), ("llamacpp", "-a"),
    ("sglang", "--served-model-name=x"), ("vllm", "--served-model"), ("sglang", "--model-pa"),
])
def test_args_that_replace_the_weights_or_the_name_are_refused(engine: str, word: str) -> None:
    """The engines keep the last value: the engine would load other weights than the path
    prestart and doctor check, or answer to a name the gateway does not route by."""
    with pytest.raises(ConfigError) as exc:
        parse_config(config_text({"engine": engine, "args": [word, "x"]}),
                     source=Path("/c.toml"))
    flag = word.split("=")[0].replace("_", "-")
    flag = {"--served-model": "--served-model-name", "--model-pa": "--model-path"}.get(flag, flag)
    assert exc.value.message.startswith(
        f"/c.toml: models.m.args: expected no {flag} (sparkd "
        "passes the weights, models.m.path, and the name the gateway routes by, m: change "
        "those instead), got"), exc.value.message


@pytest.mark.parametrize("word", ["--hos", "--ho=0.0.0.0", "--hos=0.0.0.0", "--por", "--po"])
def test_an_abbreviated_host_or_port_is_refused(word: str) -> None:
    """argparse (vLLM's FlexibleArgumentParser does not turn allow_abbrev off) takes a unique
    prefix for the flag: `--hos 0.0.0.0` would open the engine to the network."""
    with pytest.raises(ConfigError) as exc:
        parse_config(config_text({"args": [word, "0.0.0.0"]}), source=Path("/c.toml"))
    assert exc.value.message.startswith("/c.toml: models.m.args: expected no --"), \
        exc.value.message
    # Flags that only start like them stay allowed.
    parse_config(config_text({"args": ["--hf-token", "x", "--h", "--pooler-config", "{}"]}),
                 source=Path("/c.toml"))


@pytest.mark.parametrize(("engine", "word"), [
    ("vllm", "--config"), ("vllm", "--config=/etc/x.yaml"), ("sglang", "--config"),
    ("vllm", "--conf"),
])
def test_a_file_of_flags_is_refused(engine: str, word: str) -> None:
    """vLLM's and SGLang's `--config FILE` reads more flags from a file: host, port, MoE
    backend or weights set there would pass every check sparkd makes (the second review)."""
    with pytest.raises(ConfigError) as exc:
        parse_config(config_text({"engine": engine, "args": [word, "/etc/x.yaml"]}),
                     source=Path("/c.toml"))
    assert exc.value.message.startswith(
        "/c.toml: models.m.args: expected no --config (a file of flags the engine reads"), \
        exc.value.message


def test_llamacpp_has_no_config_file_flag_to_refuse() -> None:
    parse_config(config_text({"engine": "llamacpp", "args": ["--ctx-size", "4096"]}),
                 source=Path("/c.toml"))


def test_a_bad_moe_backend_choice_is_not_told_to_use_the_variable() -> None:
    """`--moe-backend bogus` on vLLM 0.34 was told "vLLM 0.34.0 reads the MoE pin from a
    variable, not a flag" (the variable is gone from 0.24; found on the installed .deb). That
    fix is for a release with no such flag (0.11.2); a bad choice is corrected in args."""
    from sparkd.engine.linecheck import check_lines

    def errors(version: str, args: list[str]) -> list[str]:
        config = parse_config(config_text({"engine_version": version, "args": args}),
                              source=Path("/c.toml"))
        return check_lines(config).errors

    [bad_choice] = errors("0.34.0", ["--moe-backend", "bogus"])
    assert "not one of the choices" in bad_choice and "from a variable" not in bad_choice
    assert bad_choice.endswith("fix: correct it in models.m.args"), bad_choice
    [no_flag] = errors("0.11.2", ["--moe-backend", "flashinfer_cutlass"])
    assert "reads the MoE pin from a variable, not a flag" in no_flag
