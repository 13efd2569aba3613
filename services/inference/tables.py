"""The inference service's metadata table (component ``inference``): one row per deployment, so a
restarted service redeploys what it served."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, String
from sqlalchemy.orm import Mapped, mapped_column

from services.core.db import Base, Migration, UTCDateTime, create_tables, utcnow

COMPONENT = "inference"


class DeploymentRow(Base):
    __tablename__ = "inference_deployments"
    name: Mapped[str] = mapped_column(String(100), primary_key=True)  # deployments/{deployment}
    # Everything else of the deployment (model version, engine, options, adapters with their
    # artifact prefixes and manifests), as written by ``DeploymentRecord.to_json``.
    spec: Mapped[dict[str, Any]] = mapped_column(JSON)
    create_time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)
    update_time: Mapped[datetime] = mapped_column(UTCDateTime, default=utcnow)


MIGRATIONS = [Migration(1, "deployments table", create_tables(DeploymentRow.__table__))]
