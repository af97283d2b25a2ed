"""Capture real NVML answers as a test fixture (run on a machine with an NVIDIA GPU).

Starts a PyTorch process that holds GPU memory and keeps the GPU busy (so the process list and
utilization have something to show), then records every NVML answer sparkd's reader uses, and
the reading sparkd makes of them, into the JSON file named on the command line.

    python3 scripts/capture_nvml.py OUT.json [GIB]
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pynvml

from sparkd.monitor.nvml import capture, read

LOAD = r"""
import sys, time, torch
x = torch.empty(int(float(sys.argv[1]) * (1 << 30)), dtype=torch.uint8, device="cuda")
a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
print("ready", flush=True)
end = time.time() + 30
while time.time() < end:
    a = (a @ a).clamp_(-1, 1)
    torch.cuda.synchronize()
"""


def main() -> int:
    out = Path(sys.argv[1])
    gib = sys.argv[2] if len(sys.argv) > 2 else "10"
    load = subprocess.Popen([sys.executable, "-c", LOAD, gib], stdout=subprocess.PIPE, text=True)
    try:
        assert load.stdout is not None
        if load.stdout.readline().strip() != "ready":
            raise SystemExit("the GPU load did not start")
        time.sleep(3)
        raw = capture(pynvml)
        reading = read(pynvml)
    finally:
        load.terminate()
        load.wait()
    smi = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip()
    doc = {
        "source": f"captured by scripts/capture_nvml.py on {time.strftime('%Y-%m-%d')}; "
                  f"{smi}; a PyTorch process held {gib} GiB and ran bf16 matrix products",
        "load_pid": load.pid,
        "captured": raw,
        "reading": reading.to_json(),
    }
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc["reading"], indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
