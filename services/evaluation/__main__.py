"""``python -m services.evaluation``: serve the evaluation API and run its job worker until SIGTERM."""

from __future__ import annotations

from services.core.entrypoint import run_service

from .app import build_app
from .settings import EvaluationSettings

if __name__ == "__main__":
    run_service(build_app, EvaluationSettings)
