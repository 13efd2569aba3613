"""Trainer checkpoints in S3: uploaded as they are written (manifest last), and the newest complete one
found and downloaded again on resume.

A checkpoint is complete when its ``manifest.json`` exists (the artifact store writes it after every file).
An attempt killed while uploading leaves a partial one (some files, no manifest): a resumed attempt ignores it
and removes it. A complete one that cannot be downloaded intact (a file missing, or its sha256 differs from
the manifest's, e.g. left by an attempt that was still uploading while the job had moved on) is removed too,
and the attempt resumes from the one before it.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from services.core.artifacts import MANIFEST_NAME, S3ArtifactStore
from services.core.errors import DataLoss, NotFound

_STEP_RE = re.compile(r"/checkpoints/step-(\d{8})/(.+)$")

Log = Callable[..., Any]


def job_prefix(job_name: str) -> str:
    """``training/{job-id}`` for ``trainingJobs/{job-id}``."""
    return f"training/{job_name.split('/')[-1]}"


def checkpoint_prefix(job_name: str, step: int) -> str:
    return f"{job_prefix(job_name)}/checkpoints/step-{step:08d}"


def _checkpoints(store: S3ArtifactStore, job_name: str) -> dict[int, bool]:
    """``{step: complete}`` of every checkpoint with at least one object."""
    found: dict[int, bool] = {}
    for obj in store.list(f"{job_prefix(job_name)}/checkpoints"):
        m = _STEP_RE.search(obj.key)
        if m:
            step = int(m.group(1))
            found[step] = found.get(step, False) or m.group(2) == MANIFEST_NAME
    return found


def complete_checkpoints(store: S3ArtifactStore, job_name: str) -> list[tuple[int, str]]:
    """``(step, prefix)`` of every checkpoint whose manifest exists (it is written last), oldest first."""
    return [(step, checkpoint_prefix(job_name, step))
            for step, complete in sorted(_checkpoints(store, job_name).items()) if complete]


def remove_partial(store: S3ArtifactStore, job_name: str, log: Log) -> list[int]:
    """Delete every checkpoint without a manifest (an attempt died while uploading it); the steps removed.
    Only a resumed attempt calls this: the attempt before it is dead, nothing else writes the job's checkpoints."""
    removed = []
    for step, complete in sorted(_checkpoints(store, job_name).items()):
        if not complete:
            objects = store.delete_prefix(checkpoint_prefix(job_name, step))
            log("partial checkpoint removed", step=step, prefix=checkpoint_prefix(job_name, step), objects=objects)
            removed.append(step)
    return removed


def download_latest(store: S3ArtifactStore, job_name: str, dest_root: Path,
                    log: Log | None = None) -> tuple[int, str, Path] | None:
    """Download the newest complete checkpoint into ``dest_root/checkpoint-N`` (every file verified against the
    manifest); None if there is none. A checkpoint that does not download intact is removed (manifest first, so
    a crash halfway leaves a partial one) and the one before it is tried."""
    for step, prefix in reversed(complete_checkpoints(store, job_name)):
        dest = dest_root / f"checkpoint-{step}"
        if dest.exists():
            shutil.rmtree(dest)
        try:
            store.download_dir(prefix, dest)
        except (NotFound, DataLoss) as err:
            shutil.rmtree(dest, ignore_errors=True)
            if log is not None:
                log("unusable checkpoint removed", step=step, prefix=prefix, error=err.message)
            store.delete(f"{prefix}/{MANIFEST_NAME}")
            store.delete_prefix(prefix)
            continue
        return step, prefix, dest
    return None
