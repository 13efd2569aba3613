"""The ``merge`` job kind (MergeAdapter): runs in the job's child process.

Downloads the base model and the adapter (verified against their manifests), merges them with the
recipes' ``merge_adapter``, uploads the result to ``training/{job-id}/outputs/merged`` and registers
it as a MERGED version whose lineage parent is the adapter version.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from services.core.artifacts import S3ArtifactStore
from services.core.jobs.context import JobContext
from services.core.jobs.register import register_version
from services.core.jobs.secrets import s3_settings_for

from .recipes.merge import merge_adapter


def run_merge(ctx: JobContext) -> dict[str, Any]:
    spec = ctx.spec
    store = S3ArtifactStore.connect(s3_settings_for(spec["s3"]))
    workdir = Path(ctx.workdir)
    ctx.progress(fraction=0.0, step=0, total_steps=3)
    store.download_dir(spec["base_model"]["artifact_prefix"], workdir / "base")
    store.download_dir(spec["adapter"]["artifact_prefix"], workdir / "adapter")
    ctx.log("inputs downloaded", base_model=spec["base_model"]["name"], adapter=spec["adapter"]["name"])
    ctx.progress(fraction=1 / 3, step=1, total_steps=3)
    merged = merge_adapter(workdir / "base", workdir / "adapter", workdir / "merged")
    prefix = f"training/{ctx.name.split('/')[-1]}/outputs/merged"
    store.upload_dir(prefix, merged)
    ctx.log("merged model uploaded", prefix=prefix)
    ctx.progress(fraction=2 / 3, step=2, total_steps=3)
    name = register_version(
        spec["registry_addr"], parent=spec["output"]["model"], kind="merged", artifact_prefix=prefix,
        base_model_version=spec["adapter"]["name"], dataset_versions=spec.get("dataset_versions", []), job=ctx.name,
        parameters={"method": "merge", "base_model_version": spec["base_model"]["name"]},
        description=spec["output"]["description"])
    ctx.log("version registered", version=name, kind="merged")
    ctx.progress(fraction=1.0, step=3, total_steps=3)
    return {"merged_version": name, "merged_prefix": prefix}
