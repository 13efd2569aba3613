"""``python -m services.pipeline``: serve the pipeline API and run its job worker until SIGTERM."""

from __future__ import annotations

from services.core.entrypoint import run_service

from .app import build_app
from .settings import PipelineSettings

if __name__ == "__main__":
    run_service(build_app, PipelineSettings)
