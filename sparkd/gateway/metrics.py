"""The gateway's Prometheus metrics, in a registry of its own (one per app: tests run many)."""

from __future__ import annotations

from typing import Any, TypeVar, cast

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5,
                   10, 30, 60, 120, 300)


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "sparkd_gateway_requests", "Requests answered, by model, route, workload class, "
            "variant and HTTP status", ["model", "route", "workload", "variant", "status"],
            registry=r)
        self.rewrites = Counter(
            "sparkd_gateway_rewrites", "Changes role policies made to message lists",
            ["model", "policy"], registry=r)
        self.rewritten_requests = Counter(
            "sparkd_gateway_rewritten_requests", "Requests whose messages a role policy changed",
            ["model", "policy"], registry=r)
        self.refused = Counter(
            "sparkd_gateway_refused", "Requests refused by the gateway, by error code",
            ["code"], registry=r)
        self.held = Gauge("sparkd_gateway_held_requests",
                          "Requests waiting for a model to load or a swap to end", registry=r)
        self.hold_seconds = Histogram(
            "sparkd_gateway_hold_seconds", "Time requests waited before being served or refused",
            buckets=LATENCY_BUCKETS, registry=r)
        self.upstream_seconds = Histogram(
            "sparkd_gateway_upstream_response_seconds",
            "Time from forwarding a request to the engine's response headers",
            ["model", "variant"], buckets=LATENCY_BUCKETS, registry=r)
        self.decode_rate = Gauge(
            "sparkd_gateway_decode_tokens_per_second",
            "Mean decode speed seen (measured dispatch), by model, class and variant",
            ["model", "workload", "variant"], registry=r)
        self.daemon_connected = Gauge(
            "sparkd_gateway_daemon_connected", "1 while the daemon's event stream is open",
            registry=r)
        self.swap_requests = Counter(
            "sparkd_gateway_swap_requests", "On-demand swaps asked of the daemon", ["model"],
            registry=r)
        self.unload_requests = Counter(
            "sparkd_gateway_unload_requests", "Idle unloads asked of the daemon", ["model"],
            registry=r)
        # The door (sparkd/gateway/door.py).
        self.connections_closed = Counter(
            "sparkd_gateway_connections_closed", "Connections the gateway closed, by reason"
            " (header_timeout, idle_timeout, body_timeout, limit_evicted, limit_refused)",
            ["reason"], registry=r)
        self.connections = Gauge("sparkd_gateway_connections", "Client connections open",
                                 registry=r)
        self.body_bytes = Gauge("sparkd_gateway_body_bytes_in_flight",
                                "Bytes of request bodies the gateway holds", registry=r)


_Metric = TypeVar("_Metric", Counter, Histogram)
_CHILDREN: dict[tuple[int, tuple[str, ...]], Any] = {}


def child(metric: _Metric, *labels: str) -> _Metric:
    """metric.labels(...), remembered (the lookup takes a lock and builds tuples)."""
    key = (id(metric), labels)
    child = _CHILDREN.get(key)
    if child is None:
        child = _CHILDREN[key] = metric.labels(*labels)
        if len(_CHILDREN) > 100_000:  # pragma: no cover - label sets are bounded
            _CHILDREN.clear()
    return cast(_Metric, child)
