"""`make demo`: a narrated tour of sparkd on a real systemd, with simulated engines.

Boots a systemd container (the system tier's harness), installs the sparkd .deb in it with the
shipped /etc/sparkd.toml (two simulated models), and shows: the daemon and its STATUS line,
`sparkctl status`, `sparkctl models`, a generated engine unit, the prestart log, a chat request
to the engine, `kill -9` of sparkd (the engine keeps running and is adopted), and `kill -9` of
the engine (systemd restarts it and sparkd reports it). When `make llama-server` has built the
real llama-server (make test does), a swap to it on a tiny generated model and a chat request
through the gateway. Everything is cleaned up at the end.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests" / "system"))
sys.path.insert(0, str(REPO / "bench"))

import checks  # noqa: E402
from checks import prop, wait_for  # noqa: E402
from container import deb_path  # noqa: E402
from harness import Container  # noqa: E402

ENGINE = "sparkd-engine@sim-small.service"
BOLD, DIM, RESET = "\033[1m", "\033[2m", "\033[0m"


def say(text: str) -> None:
    print(f"\n{BOLD}== {text}{RESET}", flush=True)


def run(box: Container, command: str, *, lines: int | None = None) -> str:
    print(f"{DIM}# {command}{RESET}", flush=True)
    result = box.sh(command, check=False)
    out = (result.stdout + result.stderr).rstrip("\n")
    shown = out.splitlines()
    if lines is not None and len(shown) > lines:
        shown = [*shown[:lines], f"{DIM}... ({len(shown) - lines} more lines){RESET}"]
    print("\n".join(shown), flush=True)
    return result.stdout


def serving(box: Container) -> bool:
    return checks.serving(box, "sim-small")


def llama_server() -> Path | None:
    """The llama-server `make llama-server` built, when it has been built (make test does)."""
    out = subprocess.run([str(REPO / "scripts" / "build-llama-server.sh"), "--print-path"],
                         capture_output=True, text=True, check=False).stdout.strip()
    return Path(out) if out and Path(out).exists() else None


def real_engine(box: Container) -> None:
    """The real llama-server under sparkd, when it is built: a tiny generated model (random
    weights: its words mean nothing), swapped in and out like any other."""
    binary = llama_server()
    if binary is None:
        say("(make llama-server builds the real llama.cpp engine: the demo then swaps to it)")
        return
    gguf = REPO / "build" / "tiny-demo.gguf"
    subprocess.run([sys.executable, str(REPO / "tests" / "integration" / "tiny_gguf.py"),
                    str(gguf)], check=True, capture_output=True)
    gguf.chmod(0o644)
    say(f"The real llama-server ({binary.parent.parent.name}) on a tiny generated GGUF: "
        "a model added to the config, and a swap to it")
    section = (f'\n[models.tiny]\nengine = "llamacpp"\nbinary = "{binary}"\n'
               f'path = "/src/build/{gguf.name}"\nport = 8110\nmemory_gib = 0.1\n'
               'args = ["--threads", "2", "--ctx-size", "512"]\n')
    box.exec(["tee", "-a", "/etc/sparkd.toml"], input=section, quiet=True)
    print(section)
    run(box, "systemctl reload sparkd && echo reloaded")
    run(box, "sparkctl swap tiny")
    body = json.dumps({"model": "tiny", "messages": [{"role": "user", "content": "Hi"}],
                       "max_tokens": 8})
    say("Through the gateway (port 8000), the real engine answers")
    run(box, "curl -s http://127.0.0.1:8000/v1/chat/completions "
             f"-H 'Content-Type: application/json' -d '{body}' | python3 -m json.tool",
        lines=24)
    run(box, "sparkctl status", lines=12)
    run(box, "sparkctl swap sim-small")


def main() -> int:
    deb = deb_path()
    say("Booting a real systemd in a container (overlay of this machine, private network)")
    with Container(deb_dir=deb.parent, src_dir=REPO) as box:
        box.boot()
        print(box.wait_running())
        say(f"Installing {deb.name}: postinst creates user sparkd and starts sparkd.service")
        box.install_deb(deb.name)
        wait_for("the default model to serve", lambda: serving(box))

        say("sparkd is Type=notify: systemd shows its one-line STATUS")
        run(box, "systemctl status sparkd --no-pager", lines=9)

        say("sparkctl status: engines, health and unified memory (page cache included)")
        run(box, "sparkctl status")

        say("sparkctl models: every model, its files' state (no hashing) and what serves")
        run(box, "sparkctl models")

        say("The engine unit sparkd generated: prestart, health wait, restart policy, weights")
        run(box, f"systemctl cat {ENGINE} | grep -E '^(Exec|Environment|Timeout|Restart|"
                 "CPUWeight|IOWeight|OOMScoreAdjust|User|DeviceAllow|ProtectSystem)'")

        say("A vLLM model gets its MoE backend pinned in the form its release reads: "
            "the variable before 0.17, --moe-backend after (no daemon needed)")
        box.sh("printf '[models.qwen]\\nengine = \"vllm\"\\nport = 8201\\nmemory_gib = 70\\n"
               "binary = \"/usr/bin/true\"\\n' > /root/vllm-example.toml")
        run(box, "sparkctl units --config /root/vllm-example.toml | grep -E '^(# Engine|"
                 "# WARNING|Environment=VLLM|ExecStart=)'")

        say("Before the engine started, prestart dropped the page cache and gated on memory")
        run(box, f"journalctl -b -u {ENGINE} -o cat --no-pager | grep prestart")

        say("A chat request to the engine (the simulated one: a test double)")
        body = json.dumps({
            "model": "sim-small",
            "messages": [{"role": "user", "content": "Hello from the demo"}],
            "max_tokens": 8,
        })
        run(box, "curl -s http://127.0.0.1:8101/v1/chat/completions "
                 f"-H 'Content-Type: application/json' -d '{body}' | python3 -m json.tool",
            lines=30)

        say("kill -9 of sparkd: systemd restarts it; the engine keeps running and is adopted")
        engine_pid = prop(box, ENGINE, "MainPID")
        daemon_pid = prop(box, "sparkd.service", "MainPID")
        print(f"engine MainPID {engine_pid}, sparkd MainPID {daemon_pid}")
        run(box, "systemctl kill --signal=SIGKILL sparkd.service")
        wait_for("sparkd to come back", lambda: prop(box, "sparkd.service", "MainPID")
                 not in ("0", daemon_pid))
        wait_for("sparkd to serve again", lambda: serving(box))
        print(f"engine MainPID now {prop(box, ENGINE, 'MainPID')} (unchanged), sparkd MainPID "
              f"now {prop(box, 'sparkd.service', 'MainPID')}")
        run(box, "journalctl -b SPARKD_EVENT=engine_adopted -o cat --no-pager")

        say("kill -9 of the engine: systemd restarts it (with prestart again); sparkd sees it")
        run(box, f"systemctl kill --signal=SIGKILL {ENGINE}")
        wait_for("the engine to restart", lambda: prop(box, ENGINE, "NRestarts") == "1"
                 and prop(box, ENGINE, "ActiveState") == "active", timeout=90)
        wait_for("sparkd to report it healthy", lambda: serving(box))
        run(box, "sparkctl status")

        say("Events are structured journal entries: journalctl SPARKD_EVENT=... -o json")
        run(box, "journalctl -b SPARKD_EVENT=engine_starting -o json --no-pager | python3 -c "
                 "\"import json,sys; [print({k: v for k, v in json.loads(l).items() "
                 "if k.startswith(('SPARKD_', 'MESSAGE'))}) for l in sys.stdin]\"")
        real_engine(box)
        say("Done: the container is powered off and removed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
