"""Prometheus metrics of the inference service (served on its gRPC server's metrics port)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

# Errors caught in background work instead of failing a call (each is also logged with its reason):
# task = engine_ready_probe | supervisor | stream_reader | health_publisher
TASK_ERRORS = Counter("inference_task_errors_total", "Errors caught in the service's background work", ["task", "reason"])
ENGINE_RESTARTS = Counter(
    "inference_engine_restarts_total", "Engines restarted after they died or stopped answering", ["deployment", "reason"]
)
OPEN_STREAMS = Gauge("inference_open_streams", "Chat/Complete streams open on this service")
