"""Local cache of model files: ``<data_dir>/cache/<sha>`` where ``sha`` hashes the manifest.

A version's files are downloaded (and verified against the manifest) into a temporary folder next
to the cache, then renamed into place, so a folder in the cache is always complete. Two versions
with the same files share a folder. Deleting the cache loses nothing: the next Deploy pulls again.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
import uuid
from pathlib import Path

from services.core.artifacts import ArtifactStore, Manifest
from services.core.logging import get_logger

log = get_logger(__name__)


def manifest_key(manifest: Manifest) -> str:
    """A stable id of a set of files: sha256 over the sorted (path, size, sha256) entries."""
    h = hashlib.sha256()
    for entry in sorted(manifest.files, key=lambda e: e.path):
        h.update(f"{entry.path}\0{entry.size}\0{entry.sha256}\n".encode())
    return h.hexdigest()


class ModelCache:
    """Pulls manifests' files from the artifact store into ``root`` (blocking; call from a thread)."""

    def __init__(self, store: ArtifactStore, root: Path) -> None:
        self._store = store
        self._root = Path(root)
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def path_for(self, manifest: Manifest) -> Path:
        return self._root / manifest_key(manifest)[:32]

    def ensure(self, artifact_prefix: str, manifest: Manifest) -> Path:
        """The local folder holding ``manifest``'s files, downloading them if missing."""
        dest = self.path_for(manifest)
        with self._guard:
            lock = self._locks.setdefault(dest.name, threading.Lock())
        with lock:
            if dest.is_dir():
                log.info("cache_hit", prefix=artifact_prefix, path=str(dest))
                return dest
            tmp = self._root / f".tmp-{dest.name}-{uuid.uuid4().hex[:8]}"
            try:
                self._store.download_dir(artifact_prefix, tmp, manifest=manifest)
                tmp.mkdir(parents=True, exist_ok=True)  # a manifest without files is still a folder
                tmp.rename(dest)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
            log.info("cache_filled", prefix=artifact_prefix, path=str(dest), files=len(manifest.files),
                     size=manifest.total_size)
            return dest
