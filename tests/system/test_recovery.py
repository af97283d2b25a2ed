"""Power-failure recovery at boot, with no person in the loop.

A power cut is SIGKILL of the container; booting the same overlay again is the next boot.
"""

from __future__ import annotations

import pytest
from checks import serving, status, wait_for
from harness import Container

pytestmark = pytest.mark.system

CONFIG = """
[daemon]
default_model = "a"
memory_reserve_gib = 1
health_interval_s = 1
last_good_after_s = 2
settle_timeout_s = 2

[models.a]
engine = "sim"
port = 8101
load_timeout_s = 30
args = ["--load-seconds", "1", "--weights-mib", "16"]

[models.bad]
engine = "sim"
port = 8102
load_timeout_s = 30
args = ["--load-seconds", "1", "--crash-after", "0.3", "--weights-mib", "8"]
"""


def reboot_after_power_cut(box: Container) -> None:
    box.power_cut()
    box.boot()
    box.wait_running()


def test_power_cut_then_boot_brings_the_model_back(container: Container) -> None:
    box = container
    box.exec(["systemctl", "stop", "sparkd", "sparkd-engine@*"])
    box.exec(["tee", "/etc/sparkd.toml"], input=CONFIG)
    box.exec(["rm", "-f", "/var/lib/sparkd/state.toml"])
    box.exec(["systemctl", "start", "sparkd"])
    wait_for("a to serve and become last good",
             lambda: serving(box, "a") and (status(box) or {}).get("last_good_model") == "a",
             timeout=90)
    first_boot = box.boot_id()

    reboot_after_power_cut(box)
    assert box.boot_id() != first_boot
    wait_for("a to serve after the power cut", lambda: serving(box, "a"), timeout=90)
    unclean = box.exec(["journalctl", "-b", "SPARKD_EVENT=unclean_shutdown", "-o", "cat",
                        "--no-pager"]).stdout
    assert f"the previous boot {first_boot} ended without a clean sparkd stop" in unclean
    state = box.exec(["cat", "/var/lib/sparkd/state.toml"]).stdout
    assert f'boot_id = "{box.boot_id()}"' in state
    # Prestart made room before the engine started, in this boot: the blanket drop, or a warm
    # start, since a's weights live on the container's tmpfs layer, which the simulated power
    # cut keeps (a real one empties the page cache: nothing cached, the blanket drop).
    log = box.exec(["journalctl", "-b", "-u", "sparkd-engine@a.service", "-o", "cat",
                    "--no-pager"]).stdout
    assert ("prestart a: drop_caches: freed" in log
            or "prestart a: warm: kept" in log), log


def test_desired_model_broken_after_the_outage_falls_back_to_the_last_good(
    container: Container,
) -> None:
    box = container
    box.exec(["systemctl", "stop", "sparkd"])
    # The operator had swapped to `bad`, which no longer starts (say its weights broke).
    box.sh("sed -i 's/^desired_model = .*/desired_model = \"bad\"/' /var/lib/sparkd/state.toml")
    reboot_after_power_cut(box)
    wait_for("the fallback to a", lambda: serving(box, "a"), timeout=120)
    s = status(box)
    assert s is not None
    assert s["desired_model"] == "a"
    assert s["last_failure"]["model"] == "bad"
    rollback = box.exec(["journalctl", "-b", "SPARKD_EVENT=rollback", "-o", "cat",
                         "--no-pager"]).stdout
    assert "rollback to a done" in rollback
