"""The modules the docs call pure import no adapter library: each is imported in a fresh
interpreter, which then reports what got imported with it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PURE = (
    "sparkd.units.render",
    "sparkd.engine.plan",
    "sparkd.engine.unit",
    "sparkd.engine.probe",
    "sparkd.engine.fingerprints",
    "sparkd.engine.warm",
    "sparkd.gateway.rewrite",
    "sparkd.gateway.classify",
    "sparkd.gateway.limits",
    "sparkd.gateway.prepare",
    "sparkd.gateway.worker",  # not pure (a process and pipes), but light: no aiohttp to start
    "sparkd.gateway.routing",
    "sparkd.gateway.routes",
    "sparkd.gateway.media",
    "sparkd.gateway.auth",
    "sparkd.monitor.memory",
    "sparkd.monitor.psi",
    "sparkd.monitor.liveness",
    "sparkd.monitor.floor",
    "sparkd.monitor.devices",
    "sparkd.config_devices",
    "sparkd.monitor.desktop",
    "sparkd.monitor.lateness",  # the probe process: standard library only
    "sparkd.desktop_config",
    "sparkd.store.plan",
    "sparkd.config",
    "sparkd.config_checks",
    "sparkd.metrics_config",
    "sparkd.engine.version_form",
    "sparkd.engine.argforms",
    "sparkd.engine.config_rules",
    "sparkd.control.codec",
    "sparkd.control.status",
    "sparkd.daemon.engines",
    "sparkd.daemon.report",
    "sparkd.daemon.actions",
    "sparkd.daemon.resume",
)
ADAPTERS = ("aiohttp", "pystemd", "pynvml", "pyudev", "click", "rich", "sdnotify",
            "huggingface_hub", "psutil")


@pytest.mark.parametrize("module", PURE)
def test_a_pure_module_imports_no_adapter(module: str) -> None:
    code = (f"import importlib, json, sys; importlib.import_module({module!r}); "
            f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in "
            f"{ADAPTERS!r})))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert json.loads(out) == [], f"{module} pulls in adapters"


def test_the_check_sees_an_adapter() -> None:
    """The check itself can fail: an adapter module is seen."""
    code = ("import importlib, json, sys; importlib.import_module('sparkd.engine.health'); "
            "print(json.dumps('aiohttp' in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    assert json.loads(out) is True
