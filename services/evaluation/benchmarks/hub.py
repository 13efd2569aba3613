"""Benchmark data from a dataset hub: Hugging Face (or a mirror, through ``huggingface_hub``) or ModelScope (its
dataset file API over HTTP), cached on disk.

A split is cached as the files it was read from plus a ``complete.json`` marker written last: a cached split loads
with no request at all, and a download cut short leaves no marker, so it is fetched again next time.
"""

from __future__ import annotations

import csv
import fnmatch
import json
import shutil
import tempfile
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from services.core.errors import FailedPrecondition, NotFound, Unavailable
from services.evaluation.benchmarks.types import DataSource

PARQUET_REVISION = "refs/convert/parquet"  # the hub's automatic parquet export of script/CSV datasets


@dataclass(frozen=True)
class Split:
    """One split of one config of a dataset repository (names as lm-eval's task YAML gives them)."""

    repo: str
    config: str | None
    split: str

    def describe(self) -> str:
        return f"{self.repo}" + (f" ({self.config})" if self.config else "") + f" split {self.split!r}"


def candidate_patterns(split: Split) -> list[str]:
    """File layouts the hub uses for a (config, split), most specific first: parquet per config folder (cais/mmlu,
    allenai/ai2_arc, openai/gsm8k), parquet under data/, CSV folders (haonan-li/cmmlu: ``test/agronomy.csv``,
    ceval/ceval-exam: ``val/accountant_val.csv``), JSON lines."""
    c, s = split.config, split.split
    pats: list[str] = []
    if c:
        pats += [
            f"{c}/{s}-*.parquet",
            f"{c}/{s}/*.parquet",
            f"{c}/partial-{s}/*.parquet",
            f"data/{c}/{s}-*.parquet",
            f"data/{c}-{s}-*.parquet",
            f"{s}/{c}.csv",
            f"{s}/{c}_{s}.csv",
            f"data/{s}/{c}.csv",
            f"{c}/{s}.jsonl",
            f"{c}/{s}.json",
            f"{c}/{s}-*.jsonl",
        ]
    if not c or c == "default":
        pats += [
            f"data/{s}-*.parquet",
            f"{s}-*.parquet",
            f"default/{s}/*.parquet",
            f"default/partial-{s}/*.parquet",
            f"data/{s}.jsonl",
            f"{s}.jsonl",
            f"data/{s}.csv",
        ]
    return pats


def pick_files(files: list[str], split: Split) -> list[str]:
    for pattern in candidate_patterns(split):
        hits = sorted(f for f in files if fnmatch.fnmatchcase(f, pattern))
        if hits:
            return hits
    return []


def read_rows(path: Path) -> list[dict]:
    name = path.name
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if name.endswith(".csv"):
        with path.open(encoding="utf-8", newline="") as fh:
            return [dict(row) for row in csv.DictReader(fh)]
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    if name.endswith(".json"):
        doc = json.loads(path.read_text(encoding="utf-8"))
        return doc["examples"] if isinstance(doc, dict) and "examples" in doc else list(doc)
    raise FailedPrecondition(f"cannot read {name}: not parquet, csv or json", reason="BENCHMARK_DATA_FORMAT")


def _cache_dir(data: DataSource, hub: str, split: Split) -> Path:
    safe = split.repo.replace("/", "__")
    return Path(data.cache_dir) / hub / safe / (split.config or "default") / split.split


def _cached(folder: Path) -> list[Path] | None:
    marker = folder / "complete.json"
    if not marker.is_file():
        return None
    try:
        names = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return None
    paths = [folder / "files" / n for n in names]
    return paths if all(p.is_file() for p in paths) else None


def _commit(folder: Path, staging: Path, names: list[str], meta: dict) -> list[Path]:
    """Move a finished download into place and write the marker last."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    staging.rename(folder / "files")
    (folder / "complete.json").write_text(json.dumps({"files": names, **meta}, indent=1))
    return [folder / "files" / n for n in names]


def load_split(data: DataSource, split: Split, *, hub: str | None = None) -> list[dict]:
    """Rows of a split from the cache, else from the hub (``hf`` or ``modelscope``; ``auto`` means hf)."""
    hub = hub or ("modelscope" if data.hub == "modelscope" else "hf")
    folder = _cache_dir(data, hub, split)
    paths = _cached(folder)
    if paths is None:
        if data.offline:
            raise FailedPrecondition(
                f"{split.describe()} is not in the benchmark cache {data.cache_dir} and the data source is offline",
                reason="BENCHMARK_NOT_CACHED",
                metadata={"repo": split.repo},
            )
        paths = _download_hf(data, split, folder) if hub == "hf" else _download_modelscope(data, split, folder)
    rows: list[dict] = []
    for p in paths:
        rows.extend(read_rows(p))
    return rows


# ----------------------------------------------------------------------------- Hugging Face


def _download_hf(data: DataSource, split: Split, folder: Path) -> list[Path]:
    import huggingface_hub
    from huggingface_hub import HfApi, hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    endpoint = data.hf_endpoint.rstrip("/")
    where = f"dataset {split.repo} at {endpoint}"
    if huggingface_hub.constants.HF_HUB_OFFLINE:
        raise Unavailable(
            f"{where}: HF_HUB_OFFLINE is set in the service's environment, so nothing can be fetched",
            reason="BENCHMARK_HUB_UNAVAILABLE",
            metadata={"repo": split.repo, "endpoint": endpoint},
        )
    token = data.hf_token or False
    api = HfApi(endpoint=endpoint, token=token)
    try:
        revision = "main"
        names = pick_files(api.list_repo_files(split.repo, repo_type="dataset", revision=revision), split)
        if not names:
            revision = PARQUET_REVISION
            try:
                names = pick_files(api.list_repo_files(split.repo, repo_type="dataset", revision=revision), split)
            except RevisionNotFoundError:
                names = []
        if not names:
            raise NotFound(
                f"{where}: no files for {split.describe()}",
                reason="BENCHMARK_DATA_NOT_FOUND",
                metadata={"repo": split.repo, "endpoint": endpoint},
            )
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
        try:
            for name in names:
                hf_hub_download(
                    split.repo,
                    name,
                    repo_type="dataset",
                    revision=revision,
                    endpoint=endpoint,
                    token=token,
                    local_dir=staging,
                )
            shutil.rmtree(staging / ".cache", ignore_errors=True)
            return _commit(folder, staging, names, {"hub": "hf", "endpoint": endpoint, "revision": revision})
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    except GatedRepoError:
        raise Unavailable(
            f"{where}: gated dataset, set an HF token with access",
            reason="BENCHMARK_HUB_DENIED",
            metadata={"repo": split.repo, "endpoint": endpoint},
        ) from None
    except RepositoryNotFoundError:
        raise NotFound(
            f"{where}: dataset repository not found",
            reason="BENCHMARK_DATA_NOT_FOUND",
            metadata={"repo": split.repo, "endpoint": endpoint},
        ) from None
    except (RevisionNotFoundError, EntryNotFoundError):
        raise NotFound(
            f"{where}: files for {split.describe()} not found",
            reason="BENCHMARK_DATA_NOT_FOUND",
            metadata={"repo": split.repo, "endpoint": endpoint},
        ) from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        raise Unavailable(
            f"{where}: download failed: {type(exc).__name__}: {exc}".splitlines()[0],
            reason="BENCHMARK_HUB_UNAVAILABLE",
            metadata={"repo": split.repo, "endpoint": endpoint},
        ) from None


# ----------------------------------------------------------------------------- ModelScope


def _ms_get(url: str, data: DataSource, where: str, split: Split):
    import httpx

    try:
        resp = httpx.get(url, timeout=60.0, follow_redirects=True)
    except httpx.HTTPError as exc:
        raise Unavailable(
            f"{where}: request failed: {exc}",
            reason="BENCHMARK_HUB_UNAVAILABLE",
            metadata={"repo": split.repo, "endpoint": data.modelscope_endpoint},
        ) from None
    if resp.status_code == 404:
        raise NotFound(
            f"{where}: not found",
            reason="BENCHMARK_DATA_NOT_FOUND",
            metadata={"repo": split.repo, "endpoint": data.modelscope_endpoint},
        )
    if resp.status_code >= 400:
        raise Unavailable(
            f"{where}: HTTP {resp.status_code}",
            reason="BENCHMARK_HUB_UNAVAILABLE",
            metadata={"repo": split.repo, "endpoint": data.modelscope_endpoint},
        )
    return resp


def _download_modelscope(data: DataSource, split: Split, folder: Path) -> list[Path]:
    """ModelScope's dataset file API: ``/api/v1/datasets/{ns}/{name}/repo/tree`` lists the files,
    ``/api/v1/datasets/{ns}/{name}/repo?FilePath=..`` serves one."""
    endpoint = data.modelscope_endpoint.rstrip("/")
    where = f"dataset {split.repo} at {endpoint}"
    base = f"{endpoint}/api/v1/datasets/{split.repo}/repo"
    query = urllib.parse.urlencode(
        {"Revision": "master", "Root": "/", "Recursive": "True", "PageNumber": 1, "PageSize": 10000}
    )
    listing = _ms_get(f"{base}/tree?{query}", data, where, split).json()
    if listing.get("Code", 200) not in (200, 0) or not isinstance(listing.get("Data"), dict):
        raise NotFound(
            f"{where}: dataset repository not found ({listing.get('Message', 'no data')})",
            reason="BENCHMARK_DATA_NOT_FOUND",
            metadata={"repo": split.repo, "endpoint": endpoint},
        )
    files = [f["Path"].lstrip("/") for f in listing["Data"].get("Files", []) if f.get("Type", "blob") != "tree"]
    names = pick_files(files, split)
    if not names:
        raise NotFound(
            f"{where}: no files for {split.describe()}",
            reason="BENCHMARK_DATA_NOT_FOUND",
            metadata={"repo": split.repo, "endpoint": endpoint},
        )
    folder.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".partial-", dir=folder.parent))
    try:
        for name in names:
            q = urllib.parse.urlencode({"Source": "SDK", "Revision": "master", "FilePath": name})
            body = _ms_get(f"{base}?{q}", data, f"{where}: {name}", split).content
            target = staging / name
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "wb") as fh:
                fh.write(body)
        return _commit(folder, staging, names, {"hub": "modelscope", "endpoint": endpoint})
    finally:
        shutil.rmtree(staging, ignore_errors=True)
