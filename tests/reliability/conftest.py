"""Fixtures of the reliability suite's training and storage tests: a tiny model, a small dataset that spans
several epochs, an artifact store on the session's S3 server (tests/conftest.py) and a job store (SQLite)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cli.demo_models import build_tiny_model
from services.core.artifacts import S3ArtifactStore
from services.core.db import Database
from services.core.jobs import JobStore

WORDS = ("kitten", "violin", "valley", "lemon", "apple", "river", "rocket", "garden", "pencil", "window")


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """10 rows: with batch 2 and gradient accumulation 2 an epoch is 3 optimizer steps (the last one a single
    micro-batch), so a 20-step run crosses 6 epoch boundaries and a resume lands anywhere in an epoch."""
    path = tmp_path_factory.mktemp("data") / "shout_small.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"Shout this word: {w}"},
                          {"role": "assistant", "content": f"[{w.upper()}]!"}]} for w in WORDS]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture
def store(s3_settings) -> S3ArtifactStore:
    return S3ArtifactStore.connect(s3_settings)


@pytest.fixture
def jobs(tmp_path):
    db = Database(f"sqlite:///{tmp_path / 'jobs.db'}")
    yield JobStore(db)
    db.dispose()
