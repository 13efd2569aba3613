"""The ``transformers`` engine: ``transformers_server`` in a child process of the inference service."""

from __future__ import annotations

import sys

from ..streaming import Pacing
from .base import EngineSpec, HttpEngine

DEFAULT_MAX_NUM_SEQS = 32


class TransformersEngine(HttpEngine):
    """Reference engine with no extra dependency (runs with the service's own Python)."""

    kind = "transformers"
    stop_timeout_s = 10.0

    def __init__(self, spec: EngineSpec, *, default_max_num_seqs: int = DEFAULT_MAX_NUM_SEQS,
                 pacing: Pacing | None = None) -> None:
        super().__init__(spec)
        self._default_max_num_seqs = default_max_num_seqs
        self._pacing = pacing or Pacing()

    def paces_stream(self, interval_s: float) -> bool:
        """Its server paces its SSE events itself, to the same rule as the service (``Pacing``)."""
        return self._pacing.interval_s > 0

    def command(self) -> list[str]:
        spec, opts = self.spec, self.spec.options
        cmd = [
            sys.executable, "-m", "services.inference.engines.transformers_server",
            "--model", str(spec.model_dir), "--port", str(spec.port),
            "--served-model-name", spec.served_model_name, "--dtype", opts.dtype,
            "--max-num-seqs", str(opts.max_num_seqs or self._default_max_num_seqs),
            "--threads", str(spec.omp_threads), *self._pacing.args(),
        ]
        if opts.max_model_len:
            cmd += ["--max-model-len", str(opts.max_model_len)]
        if spec.task == "embedding":
            cmd += ["--task", "embedding"]
        for alias, path in spec.adapters.items():
            cmd += ["--lora", f"{alias}={path}"]
        return cmd
