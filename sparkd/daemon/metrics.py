"""sparkd's Prometheus metrics (docs/watch.md "Shown and exported"), served on
`daemon.metrics_listen` from the daemon's own event loop: one aiohttp route, no thread.

Nothing is sampled for the metrics: a scrape builds them from the status the daemon already
keeps (`Supervisor.status()`: the watch's last PSI and NVML readings, MemAvailable read then,
each running engine's memory.current), so an endpoint nobody scrapes costs nothing but its
listening socket. A registry of its own per daemon, like the gateway's (sparkd.gateway.metrics).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from sparkd.control.status import Status
from sparkd.journal import event
from sparkd.metrics_config import split_listen

log = logging.getLogger(__name__)

# systemd ActiveState values: sparkd_engine_state has one series per state, 1 for the current.
ENGINE_STATES = ("active", "activating", "deactivating", "reloading", "inactive", "failed")
SWAP_ENDS = ("done", "refused", "rolled_back", "rollback_failed")
WATCH_ACTIONS = ("memory_floor_stop", "liveness_restart", "hung_restart", "power_stop",
                 "gpu_stop", "desktop_latency_moe", "desktop_stop")


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels)


def families(status: Status) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
    """The metrics of one status document (pure: tests call it on built statuses)."""
    mem = status.memory
    for name, value, doc in (
            ("sparkd_memory_total_bytes", mem.total_bytes, "MemTotal (/proc/meminfo)"),
            ("sparkd_memory_available_bytes", mem.available_bytes,
             "MemAvailable (/proc/meminfo): on unified memory, what the GPU can still get"),
            ("sparkd_page_cache_bytes", mem.page_cache_bytes,
             "Page cache (/proc/meminfo Cached)")):
        if value is not None:
            g = _gauge(name, doc)
            g.add_metric([], value)
            yield g
    machine = status.machine
    if machine is not None:
        if machine.floor_bytes is not None:
            g = _gauge("sparkd_memory_floor_bytes",
                       "daemon.memory_floor_gib: under it the engine that grows is stopped")
            g.add_metric([], machine.floor_bytes)
            yield g
        g = _gauge("sparkd_engine_memory_bytes", "Each running engine's cgroup "
                   "memory.current, by engine (the unit's instance name)", ["engine"])
        for engine, used in sorted(machine.engine_memory_bytes.items()):
            g.add_metric([engine], used)
        yield g
        if machine.lateness_p99_ms is not None:
            g = _gauge("sparkd_timer_lateness_p99_seconds",
                       "The desktop lateness probe's p99 wake-up lateness over its window")
            g.add_metric([], machine.lateness_p99_ms / 1000)
            yield g
        g = _gauge("sparkd_desktop", "1 for the desktop state sparkd sees", ["state"])
        for state in ("present", "headless", "unknown"):
            g.add_metric([state], 1.0 if machine.desktop == state else 0.0)
        yield g
        c = CounterMetricFamily("sparkd_watch_actions", "What the watch did since sparkd "
                                "started, by kind", labels=["kind"])
        for kind in sorted(set(WATCH_ACTIONS) | set(machine.action_counts)):
            c.add_metric([kind], machine.action_counts.get(kind, 0))
        yield c
        c = CounterMetricFamily("sparkd_swaps", "Swaps since sparkd started, by how they "
                                "ended", labels=["result"])
        for end in sorted(set(SWAP_ENDS) | set(machine.swaps)):
            c.add_metric([end], machine.swaps.get(end, 0))
        yield c
    psi = _gauge("sparkd_pressure_ratio", "Pressure stall information: share of time tasks "
                 "stalled (0-1), by resource, kind (some, full) and window (10s, 60s)",
                 ["resource", "kind", "window"])
    for resource, p in sorted(status.pressure.items()):
        for kind, window, pct in (("some", "10s", p.some_avg10), ("some", "60s", p.some_avg60),
                                  ("full", "10s", p.full_avg10), ("full", "60s", p.full_avg60)):
            if pct is not None:
                psi.add_metric([resource, kind, window], pct / 100)
    yield psi
    yield from _gpu(status)
    yield from _engines(status)


def _gpu(status: Status) -> Iterator[GaugeMetricFamily]:
    if status.gpu is None:
        return
    gauges = {
        "util": _gauge("sparkd_gpu_utilization_ratio", "NVML utilization.gpu (0-1)",
                       ["gpu", "name"]),
        "mem": _gauge("sparkd_gpu_memory_utilization_ratio",
                      "NVML utilization.memory (0-1): time device memory was read or written",
                      ["gpu", "name"]),
        "power": _gauge("sparkd_gpu_power_watts", "NVML power usage", ["gpu", "name"]),
        "temp": _gauge("sparkd_gpu_temperature_celsius", "NVML GPU temperature",
                       ["gpu", "name"]),
    }
    for gpu in status.gpu.gpus:
        labels = [str(gpu.index), gpu.name]
        readings: tuple[tuple[str, float | None], ...] = (
            ("util", gpu.utilization_pct), ("mem", gpu.memory_utilization_pct),
            ("power", gpu.power_w), ("temp", gpu.temperature_c))
        for key, value in readings:
            if value is not None:  # not supported: no sample, never a zero
                scale = 100 if key in ("util", "mem") else 1
                gauges[key].add_metric(labels, value / scale)
    yield from gauges.values()


def _engines(status: Status) -> Iterator[GaugeMetricFamily]:
    state = _gauge("sparkd_engine_state", "1 for the engine unit's systemd ActiveState",
                   ["model", "variant", "state"])
    healthy = _gauge("sparkd_engine_healthy", "1 while the engine's /health answers and its "
                     "unit is active", ["model", "variant"])
    restarts = _gauge("sparkd_engine_restarts", "systemd's NRestarts of the engine unit",
                      ["model", "variant"])
    for e in status.engines:
        for s in (*ENGINE_STATES, *(() if e.active_state in ENGINE_STATES
                                    else (e.active_state,))):
            state.add_metric([e.model, e.variant, s], 1.0 if e.active_state == s else 0.0)
        healthy.add_metric([e.model, e.variant], 1.0 if e.healthy else 0.0)
        restarts.add_metric([e.model, e.variant], e.n_restarts)
    yield from (state, healthy, restarts)


class StatusCollector(Collector):
    """Builds the families from a fresh status at each scrape."""

    def __init__(self, status: Callable[[], Status]) -> None:
        self._status = status

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        return families(self._status())


def registry(status: Callable[[], Status]) -> CollectorRegistry:
    r = CollectorRegistry(auto_describe=False)
    r.register(StatusCollector(status))
    return r


class MetricsServer:
    """The endpoint: GET /metrics on `listen`, on the running loop."""

    def __init__(self, listen: str, status: Callable[[], Status]) -> None:
        self.listen = listen
        self._registry = registry(status)
        self._runner: object | None = None

    async def start(self) -> bool:
        """False (and an event saying why) when the address cannot be bound: sparkd runs on
        without its metrics, never fails for them."""
        from aiohttp import web

        async def metrics(_request: web.Request) -> web.Response:
            body = generate_latest(self._registry)
            return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        host, port = split_listen(self.listen)
        try:
            await web.TCPSite(runner, host, port, reuse_address=True).start()
        except OSError as exc:
            await runner.cleanup()
            event(log, "metrics_unavailable", "the metrics endpoint cannot listen on %s "
                  "(daemon.metrics_listen): %s; sparkd runs on without it", self.listen, exc,
                  level=logging.ERROR)
            return False
        self._runner = runner
        event(log, "metrics_listening", "Prometheus metrics on http://%s/metrics", self.listen)
        return True

    async def close(self) -> None:
        from aiohttp import web

        runner, self._runner = self._runner, None
        if isinstance(runner, web.AppRunner):
            await runner.cleanup()


async def follow(current: MetricsServer | None, listen: str,
                 status: Callable[[], Status]) -> MetricsServer | None:
    """The endpoint `listen` asks for (at start, and when a reload changed it): the one
    running when the address did not change, else the old one closed and a new one started
    ("": none). Returns the server now running, if any."""
    if current is not None and current.listen == listen:
        return current
    if current is not None:
        await current.close()
        event(log, "metrics_closed", "Prometheus metrics no longer on %s", current.listen)
    if not listen:
        return None
    server = MetricsServer(listen, status)
    return server if await server.start() else None
