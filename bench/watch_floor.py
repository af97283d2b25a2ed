"""Bars (issue 13): from the moment an engine's memory ramp crosses the memory floor to its
stop, <= 2 s; the watch's sampling costs <= 0.5 % of one core and <= 10 MB over the idle daemon.

Three parts:

1. How fast an allocation ramp eats memory here (a child process faulting in fresh pages as
   fast as it can): what the floor's sampling period has to beat.
2. The cost of one floor reading (`read_available`: open, read, find MemAvailable), CPU time
   per call, and what it comes to at the configured period.
3. In a booted systemd with the .deb (run as root after `make deb`):
   a. a simulated engine ramping its resident memory at 1 GiB/s, the floor set 1.5 GiB under
      the container's MemAvailable; a poller on the host (one kernel: the same MemAvailable)
      reads /proc/meminfo every 5 ms and times from the first reading under the floor to the
      first one back over it (the engine's memory returned), beside sparkd's own figure
      (the `memory_floor_stopped` event: from its first reading under the floor to the stop
      job's end);
   b. sparkd's CPU and RSS over 60 s idle (the default model serving), with the watch at its
      defaults (the floor read every 0.1 s near it, up to 1 s apart far above it; /metrics
      scraped every health tick) and with it off (memory_floor_gib = 0, liveness_strikes = 0).
"""

from __future__ import annotations

import json
import multiprocessing
import os
import sys
import time

from container import machine, sparkd_container

from sparkd.monitor.floor import available_bytes, read_available

GIB = 1 << 30
MIB = 1 << 20
PAGE = os.sysconf("SC_PAGE_SIZE")
RAMP_MIB = 3072
STOP_BAR_S = 2.0
CPU_BAR_PCT = 0.5
RSS_BAR_MB = 10.0
IDLE_S = 60.0


def _allocate(mib: int, out: multiprocessing.SimpleQueue[float]) -> None:
    began = time.perf_counter()
    blocks = []
    for _ in range(mib // 64):
        block = bytearray(64 * MIB)
        block[::PAGE] = b"\x01" * (64 * MIB // PAGE)
        blocks.append(block)
    out.put(time.perf_counter() - began)


def allocation_rate(mib: int = 2048) -> float:
    """GiB/s a single process faults in fresh memory at, here."""
    queue: multiprocessing.SimpleQueue[float] = multiprocessing.SimpleQueue()
    child = multiprocessing.Process(target=_allocate, args=(mib, queue))
    child.start()
    took = queue.get()
    child.join()
    return mib / 1024 / took


def kernel_rate(mib: int = 2048) -> float:
    """GiB/s the kernel hands out zeroed pages at (one mmap with MAP_POPULATE): the fastest an
    engine's CPU-side allocation can eat memory here."""
    import mmap

    began = time.perf_counter()
    region = mmap.mmap(-1, mib * MIB, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
                       | mmap.MAP_POPULATE)
    took = time.perf_counter() - began
    region.close()
    return mib / 1024 / took


def reading_cost(n: int = 20000) -> float:
    """CPU seconds per floor reading."""
    began = time.process_time()
    for _ in range(n):
        read_available()
    return (time.process_time() - began) / n


def cpu_rss(box: object, pid: str, hz: int) -> tuple[int, float]:
    stat = box.exec(["cat", f"/proc/{pid}/stat"]).stdout  # type: ignore[attr-defined]
    fields = stat.rsplit(")", 1)[1].split()
    status = box.exec(["cat", f"/proc/{pid}/status"]).stdout  # type: ignore[attr-defined]
    rss = next(int(line.split()[1]) / 1024 for line in status.splitlines()
               if line.startswith("VmRSS:"))
    return int(fields[11]) + int(fields[12]), rss


def idle(box: object, settings: str, hz: int) -> tuple[float, float]:
    """sparkd's CPU % of one core and RSS MB over IDLE_S with `settings` in [daemon]."""
    sh = box.sh  # type: ignore[attr-defined]
    sh("cp /root/sparkd.toml.shipped /etc/sparkd.toml && "
       f"sed -i 's/^\\[daemon\\]$/[daemon]\\n{settings}/' /etc/sparkd.toml && "
       "systemctl restart sparkd")
    from container import wait_serving

    wait_serving(box)  # type: ignore[arg-type]
    pid = sh("systemctl show -P MainPID sparkd").stdout.strip()
    time.sleep(10)  # start-up work done
    t0, (c0, _) = time.monotonic(), cpu_rss(box, pid, hz)
    time.sleep(IDLE_S)
    c1, rss = cpu_rss(box, pid, hz)
    return (c1 - c0) / hz / (time.monotonic() - t0) * 100, rss


def ramp(box: object) -> tuple[float, float, float]:
    """(host-measured cross-to-back seconds, sparkd's own ms, floor GiB)."""
    sh = box.sh  # type: ignore[attr-defined]
    sh("systemctl stop sparkd 'sparkd-engine@*'; rm -f /var/lib/sparkd/state.toml")
    floor = read_available() - (RAMP_MIB // 2) * MIB
    config = (
        "[daemon]\ndefault_model = \"ramp\"\nmemory_reserve_gib = 0\nhealth_interval_s = 1\n"
        f"settle_timeout_s = 2\nmemory_floor_gib = {floor / GIB:.4f}\n"
        "[models.ramp]\nengine = \"sim\"\nport = 8101\nload_timeout_s = 30\n"
        "args = [\"--load-seconds\", \"1\", \"--weights-mib\", \"8\", \"--resident-mib\", \"16\","
        f" \"--ramp-mib-per-s\", \"1024\", \"--ramp-max-mib\", \"{RAMP_MIB}\"]\n")
    box.exec(["tee", "/etc/sparkd.toml"], input=config)  # type: ignore[attr-defined]
    sh("systemctl start sparkd")
    crossed = back = None
    deadline = time.monotonic() + 90
    with open("/proc/meminfo", encoding="ascii") as f:
        while time.monotonic() < deadline and back is None:
            f.seek(0)
            now, avail = time.monotonic(), available_bytes(f.read())
            if crossed is None and avail < floor:
                crossed = now
            elif crossed is not None and avail >= floor:
                back = now
            time.sleep(0.005)
    if crossed is None or back is None:
        raise SystemExit("the ramp never crossed the floor, or memory never came back")
    time.sleep(1)
    out = sh("journalctl -b SPARKD_EVENT=memory_floor_stopped -o json --no-pager").stdout
    own = float(json.loads(out.splitlines()[-1])["SPARKD_DURATION_MS"])
    return back - crossed, own, floor / GIB


def main() -> int:
    rate = allocation_rate()
    kernel = kernel_rate()
    per = reading_cost()
    print(f"machine: {machine()}")
    print(f"allocation ramp: {rate:.2f} GiB/s faulted in by one process: a 4 GiB floor is "
          f"gone in {4 / rate:.2f} s")
    print(f"kernel page supply (mmap MAP_POPULATE): {kernel:.2f} GiB/s: a 4 GiB floor gone in "
          f"{4 / kernel:.2f} s")
    print(f"floor reading: {per * 1e6:.1f} us of CPU each; every 0.1 s that is "
          f"{per / 0.1 * 100:.3f} % of one core")
    with sparkd_container() as box:
        hz = int(box.exec(["getconf", "CLK_TCK"]).stdout)
        box.sh("cp /etc/sparkd.toml /root/sparkd.toml.shipped")
        on_cpu, on_rss = idle(box, "", hz)
        off_cpu, off_rss = idle(box, "memory_floor_gib = 0\\nmemory_floor_interval_s = 10\\n"
                                     "liveness_strikes = 0", hz)
        took, own_ms, floor = ramp(box)
    print(f"idle {IDLE_S:.0f} s, watch on (defaults): CPU {on_cpu:.3f} %, RSS {on_rss:.1f} MB")
    print(f"idle {IDLE_S:.0f} s, watch off:           CPU {off_cpu:.3f} %, RSS {off_rss:.1f} MB")
    print(f"ramp at 1 GiB/s past a {floor:.2f} GiB floor: {took:.3f} s from the first host "
          f"reading under the floor to the first back over it; sparkd's own figure "
          f"{own_ms:.0f} ms")
    cpu, rss = on_cpu - off_cpu, on_rss - off_rss
    ok = [took <= STOP_BAR_S, cpu <= CPU_BAR_PCT, rss <= RSS_BAR_MB]
    print(f"bar: crossing to stop {took:.2f} s <= {STOP_BAR_S} s: {'MET' if ok[0] else 'NOT MET'}")
    print(f"bar: watch CPU {cpu:.3f} % <= {CPU_BAR_PCT} %: {'MET' if ok[1] else 'NOT MET'}")
    print(f"bar: watch RSS {rss:.1f} MB <= {RSS_BAR_MB} MB: {'MET' if ok[2] else 'NOT MET'}")
    return 0 if all(ok) else 1


if __name__ == "__main__":
    sys.exit(main())
