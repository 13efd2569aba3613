"""Prometheus metrics of the gateway (served at /metrics)."""

from __future__ import annotations

from collections.abc import Container, Iterable
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


UNKNOWN_MODEL = "unknown"


def model_label(model: str, known: Iterable[Container[str]]) -> str:
    """The ``model`` label of a request: its name when some replica has a deployment by that name
    (``known``: each replica's names), else ``unknown``. The label set stays bounded by the
    deployments, whatever names clients send."""
    if not model:
        return ""
    return model if any(model in names for names in known) else UNKNOWN_MODEL


# Shared state of the replicas (gateway/shared_state.py), only with YARD_GATEWAY_REDIS__URL set.
REDIS_UP = Gauge("gateway_redis_up", "1 while this replica reaches Redis")
REDIS_ERRORS = Counter("gateway_redis_errors_total", "Redis calls that failed", ["operation"])
REDIS_FALLBACKS = Counter(
    "gateway_redis_fallbacks_total",
    "Requests whose rate limits were not checked in Redis: admitted on this replica's own windows "
    "(fail_open) or refused with 503",
    ["outcome"],  # local | refused
)
