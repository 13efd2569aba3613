"""``python -m services.inference``: serve deployments until SIGTERM (engines are stopped with it)."""

from __future__ import annotations

from services.core.entrypoint import run_service

from .app import build_app
from .settings import InferenceSettings

if __name__ == "__main__":
    run_service(build_app, InferenceSettings)
