"""Clients that stay connected to sparkd and the gateway inside a booted container, for the
timed stop and restart (issue 12: within 2 s with clients connected): used by
tests/system/test_package.py and bench/stop_restart.py.

`start_clients(box)` runs, in a transient unit `clients.service`, three clients that are each
reconnected 50 ms after they are dropped: a subscriber on sparkd's control socket (the
`subscribe` event stream that the gateway and `sparkctl swap` hold), an idle keep-alive HTTP
connection to the gateway, and a streaming chat completion through the gateway. `timed(box,
action, unit)` times a whole `systemctl ACTION UNIT` from inside the container (no nsenter in
the figure).
"""

from __future__ import annotations

import json

from checks import wait_for
from harness import Container

MODEL = "sim-small"

# Inside the container: three clients, each reconnected 50 ms after it is dropped; the
# state file says which are connected now (and how often each connected).
CLIENTS = r"""
import json, os, socket, threading, time
state = {"control": 0, "idle_http": 0, "stream": 0}
connected = {name: False for name in state}
errors = {}

def control():
    sock = socket.socket(socket.AF_UNIX)
    sock.connect("/run/sparkd/control.sock")
    sock.sendall(b'{"method":"subscribe","params":{}}\n')
    if not sock.recv(65536):
        raise OSError("closed")
    return sock

def idle_http():
    sock = socket.create_connection(("127.0.0.1", 8000), timeout=5)
    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:8000\r\nConnection: keep-alive\r\n\r\n")
    if not sock.recv(65536):
        raise OSError("closed")
    sock.settimeout(None)
    return sock

def stream():
    body = json.dumps({"model": "MODEL", "max_tokens": 8000, "stream": True,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    sock = socket.create_connection(("127.0.0.1", 8000), timeout=5)
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
                 b"Content-Type: application/json\r\nContent-Length: "
                 + str(len(body)).encode() + b"\r\n\r\n" + body)
    head = sock.recv(65536)
    if not head.startswith(b"HTTP/1.1 200") or b"data:" not in head + sock.recv(65536):
        raise OSError(f"no stream: {head[:80]!r}")
    sock.settimeout(None)
    return sock

def keep(name, connect):
    while True:
        try:
            sock = connect()
        except OSError as exc:
            errors[name] = repr(exc)
            time.sleep(0.05)
            continue
        state[name] += 1
        connected[name] = True
        try:
            while sock.recv(65536):
                pass
        except OSError:
            pass
        connected[name] = False
        sock.close()
        time.sleep(0.05)

for name, connect in (("control", control), ("idle_http", idle_http), ("stream", stream)):
    threading.Thread(target=keep, args=(name, connect), daemon=True).start()
while True:
    with open("/run/clients.tmp", "w") as out:
        json.dump({"connected": connected, "connections": state, "errors": errors}, out)
    os.rename("/run/clients.tmp", "/run/clients.json")
    time.sleep(0.05)
""".replace("MODEL", MODEL)

# Inside the container: time one systemctl command, print the seconds.
TIMER = r"""
import subprocess, sys, time
start = time.monotonic()
subprocess.run(["systemctl", *sys.argv[1:]], check=True)
print(time.monotonic() - start)
"""


def clients(box: Container) -> dict[str, dict[str, object]]:
    res = box.exec(["cat", "/run/clients.json"], check=False, quiet=True)
    try:
        result: dict[str, dict[str, object]] = json.loads(res.stdout)
    except ValueError:
        return {"connected": {}}
    return result


def all_connected(box: Container) -> bool:
    connected = clients(box)["connected"]
    return bool(connected) and all(connected.values())



def start_clients(box: Container) -> None:
    box.exec(["sh", "-c", "cat > /run/timer.py"], input=TIMER)
    box.exec(["sh", "-c", "cat > /run/clients.py"], input=CLIENTS)
    box.exec(["systemd-run", "--unit=clients", "--collect", "--quiet", "python3",
              "/run/clients.py"])
    wait_connected(box)


def wait_connected(box: Container, timeout: float = 60.0) -> None:
    try:
        wait_for("every client to connect", lambda: all_connected(box), timeout=timeout)
    except AssertionError:
        raise AssertionError(f"the clients did not all connect: {clients(box)}") from None


def timed(box: Container, action: str, unit: str) -> float:
    """The seconds a whole `systemctl ACTION UNIT` took, timed inside the container."""
    return float(box.exec(["python3", "/run/timer.py", action, unit], timeout=90,
                          quiet=True).stdout)
