"""``python -m services.registry``: serve the registry until SIGTERM."""

from __future__ import annotations

from services.core.entrypoint import run_service

from .app import build_app
from .settings import RegistrySettings

if __name__ == "__main__":
    run_service(build_app, RegistrySettings)
