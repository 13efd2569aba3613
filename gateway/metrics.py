"""Prometheus metrics of the gateway (served at /metrics)."""

from __future__ import annotations

from functools import lru_cache

from prometheus_client import Counter, Gauge, Histogram

REQUESTS = Counter("gateway_requests_total", "HTTP requests answered", ["endpoint", "model", "status"])
LATENCY = Histogram(
    "gateway_request_duration_seconds",
    "Time from request to the last byte of the response",
    ["endpoint", "model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
TTFT = Histogram(
    "gateway_time_to_first_token_seconds",
    "Time from request to the first generated chunk",
    ["model"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
)
TOKENS = Counter("gateway_tokens_total", "Tokens reported by the engine", ["model", "direction"])  # in | out
STREAM_ERRORS = Counter("gateway_stream_errors_total", "Streams that ended with an error event", ["model", "code"])
REPLICA_OUTSTANDING = Gauge("gateway_replica_outstanding_requests", "Requests in flight per replica", ["replica"])


def labelled(metric):
    """``metric.labels`` memoized: the lookup takes a lock and builds the key on every call, and the
    request path asks for the same few children all the time."""
    return lru_cache(maxsize=1024)(metric.labels)
