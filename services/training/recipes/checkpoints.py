"""Trainer checkpoints in S3: uploaded as they are written (manifest last), and the newest complete one
found and downloaded again on resume."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from services.core.artifacts import S3ArtifactStore

_STEP_RE = re.compile(r"/checkpoints/step-(\d{8})/manifest\.json$")


def job_prefix(job_name: str) -> str:
    """``training/{job-id}`` for ``trainingJobs/{job-id}``."""
    return f"training/{job_name.split('/')[-1]}"


def checkpoint_prefix(job_name: str, step: int) -> str:
    return f"{job_prefix(job_name)}/checkpoints/step-{step:08d}"


def complete_checkpoints(store: S3ArtifactStore, job_name: str) -> list[tuple[int, str]]:
    """``(step, prefix)`` of every checkpoint whose manifest exists (it is written last), oldest first."""
    found = []
    for obj in store.list(f"{job_prefix(job_name)}/checkpoints"):
        m = _STEP_RE.search(obj.key)
        if m:
            found.append((int(m.group(1)), obj.key.removesuffix("/manifest.json")))
    return sorted(found)


def download_latest(store: S3ArtifactStore, job_name: str, dest_root: Path) -> tuple[int, str, Path] | None:
    """Download the newest complete checkpoint into ``dest_root/step-N`` (verified); None if there is none."""
    found = complete_checkpoints(store, job_name)
    if not found:
        return None
    step, prefix = found[-1]
    dest = dest_root / f"checkpoint-{step}"
    if dest.exists():
        shutil.rmtree(dest)
    store.download_dir(prefix, dest)
    return step, prefix, dest
