"""The ``quantize`` job kind: runs in the job's child process (the service's own virtualenv).

1. An adapter source with ``merge_adapter``: the training service merges it (MergeAdapter job, followed
   to its end; a retried attempt follows the same merge job); the MERGED version is the source.
2. The source is downloaded and checked against its manifest.
3. Calibration text: the registry dataset's rows rendered with the model's chat template, or the
   calibration text shipped with ModelYard.
4. The quantizer runs in the quantizers' virtualenv (``quantizer.py``), its events relayed as job events;
   it scores the source and the result on the held-out text and generates once with the result.
5. The result is loaded in vLLM (the engine that serves it) and asked once; AutoAWQ output, which
   transformers cannot run on CPU, is also scored there.
6. The size is checked against what the method should give (an unquantized or half-quantized output
   fails the job), then the files are uploaded and registered as a QUANTIZED version whose lineage
   parent is the source; the version's labels name the job, so a retried attempt finds a version it
   registered before and does not register a second one.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections import deque
from pathlib import Path
from typing import Any

from modelyard.client import NotFound, RegistryClient, TrainingClient
from modelyard.common.v1 import common_pb2 as cpb
from services.core.artifacts import S3ArtifactStore
from services.core.datasets import DatasetFormat, iter_rows, to_kto, to_messages, to_preference
from services.core.errors import FailedPrecondition, Internal
from services.core.jobs.context import JobContext
from services.core.jobs.register import register_version
from services.core.jobs.secrets import s3_settings_for

DATA_DIR = Path(__file__).resolve().parent / "data"
BUILTIN_CALIBRATION = DATA_DIR / "calibration.jsonl"
HELDOUT = DATA_DIR / "heldout.txt"
PROJECT_ROOT = Path(__file__).resolve().parents[2]
JOB_LABEL = "quantization-job"
PROMPT = [{"role": "user", "content": "Name three primary colors."}]
# How much of the job's progress each phase takes (the quantizer reports 0..1 of its own part).
QUANTIZER_SPAN = (0.10, 0.85)
SIZE_SLACK = 1.25  # an output may be this much larger than expected (headers, config, tokenizer-free weights)


def run_quantization(ctx: JobContext) -> dict[str, Any]:
    spec = ctx.spec
    store = S3ArtifactStore.connect(s3_settings_for(spec["s3"]))
    workdir = Path(ctx.workdir)
    jid = ctx.name.split("/")[-1]
    done = registered_before(spec, jid)
    if done is not None:
        ctx.log("a previous attempt registered the version already", version=done)
        return {**(ctx.resume_state() or {}).get("outputs", {}), "model_version": done}
    ctx.progress(fraction=0.0)
    source, merged = spec["source"], ""
    if spec.get("adapter"):
        source = _merge(ctx, spec)
        merged = source["name"]
    store.download_dir(source["artifact_prefix"], workdir / "source")
    ctx.log("source downloaded", source=source["name"])
    ctx.progress(fraction=0.05)
    calibration = _calibration_file(ctx, store, workdir)
    out = workdir / "output"
    result = _run_quantizer(ctx, workdir, out, calibration)
    if spec.get("verify_with_vllm"):
        checked = _vllm_check(ctx, workdir, out)
        kept = {k: v for k, v in result.items() if v is not None and k != "verified_with"}
        result = {**checked, **kept, "verified_with": checked["verified_with"]}
    if not result.get("verified_with"):
        raise FailedPrecondition(
            "no engine here could load the quantized model to check it (AutoAWQ output needs "
            f"vLLM: {spec['vllm_venv']} is missing; `make engine-vllm`)",
            reason="NOT_VERIFIED",
        )
    size = _weights_size(out)
    _check_size(spec, size)
    ctx.progress(fraction=0.9)
    prefix = f"quantization/{jid}/outputs/model"
    store.upload_dir(prefix, out)
    ctx.log("quantized model uploaded", prefix=prefix, size_bytes=size)
    quality = {
        k: result[k]
        for k in ("source_perplexity", "quantized_perplexity", "top1_agreement", "eval_tokens")
        if result.get(k) is not None
    }
    if quality.get("source_perplexity") and quality.get("quantized_perplexity"):
        quality["perplexity_delta"] = quality["quantized_perplexity"] - quality["source_perplexity"]
    calib = spec["calibration"]
    outputs: dict[str, Any] = {
        "size_bytes": size,
        "source_size_bytes": spec["source_size_bytes"],
        "quality": quality,
        "merged_model_version": merged,
        "unquantized_layers": result.get("unquantized_layers", []),
        "library_versions": result.get("library_versions", {}),
        "format": spec["format"],
        "verified_with": result["verified_with"],
        "quantize_seconds": result.get("quantize_seconds"),
        "peak_rss_bytes": result.get("peak_rss_bytes"),
    }
    parameters = {
        "method": spec["method"],
        "backend": spec["backend"],
        "bits": spec["bits"],
        "group_size": spec["group_size"],
        "format": spec["format"],
        "source_model_version": source["name"],
        "calibration": {
            "dataset_version": (calib.get("dataset") or {}).get("name", "builtin") if calib["samples"] else "none",
            "samples": calib["samples"],
            "max_length": calib["max_length"],
        },
        "quality": quality,
        "size_bytes": size,
        "source_size_bytes": spec["source_size_bytes"],
        "unquantized_layers": outputs["unquantized_layers"],
        "library_versions": outputs["library_versions"],
        "verified_with": result["verified_with"],
        "heldout": "builtin",
    }
    datasets = list(source.get("dataset_versions") or [])
    if calib.get("dataset"):
        datasets.append(calib["dataset"]["name"])
    name = register_version(
        spec["registry_addr"],
        parent=spec["output"]["model"],
        kind="quantized",
        artifact_prefix=prefix,
        base_model_version=source["name"],
        dataset_versions=datasets,
        job=ctx.name,
        parameters=parameters,
        description=spec["output"]["description"],
        labels={JOB_LABEL: jid, "method": spec["method"]},
    )
    outputs["model_version"] = name
    ctx.save_resume_state({"registered": name, "outputs": outputs})
    ctx.log(
        "version registered",
        version=name,
        kind="quantized",
        size_bytes=size,
        source_size_bytes=spec["source_size_bytes"],
    )
    ctx.progress(fraction=1.0)
    return outputs


# ----------------------------------------------------------------------------- registry and merge


def registered_before(spec: dict[str, Any], jid: str) -> str | None:
    """A version of the output model that this job registered in an earlier attempt."""

    async def find() -> str | None:
        async with RegistryClient(spec["registry_addr"], timeout=60) as registry:
            try:
                page = await registry.list_model_versions(
                    parent=spec["output"]["model"], filter=f'labels.{JOB_LABEL} = "{jid}"'
                )
            except NotFound:  # no such model yet: nothing registered
                return None
            return page.model_versions[0].name if page.model_versions else None

    return asyncio.run(find())


def _merge(ctx: JobContext, spec: dict[str, Any]) -> dict[str, Any]:
    """Merge the adapter through the training service; the merged version's record."""
    adapter = spec["adapter"]["name"]

    async def merge() -> dict[str, Any]:
        async with (
            TrainingClient(spec["training_addr"], timeout=120) as training,
            RegistryClient(spec["registry_addr"], timeout=60) as registry,
        ):
            state = ctx.resume_state() or {}
            job_name = state.get("merge_job")
            if not job_name:
                job_name = (await training.merge_adapter(adapter_version=adapter)).training_job.name
                ctx.save_resume_state({"merge_job": job_name})
            ctx.log("merging the adapter first", adapter=adapter, merge_job=job_name)
            job = await training.wait_training_job(job_name)
            if job.state != cpb.JOB_STATE_SUCCEEDED:
                raise FailedPrecondition(
                    f"merging {adapter} failed ({job_name}: {job.error.message or job.state})",
                    reason="MERGE_FAILED",
                    metadata={"merge_job": job_name},
                )
            merged = await registry.get_model_version(job.outputs.merged_model_version)
            ctx.log("adapter merged", merged_version=merged.name)
            return {
                "name": merged.name,
                "artifact_prefix": merged.artifact_prefix,
                "dataset_versions": list(merged.lineage.dataset_versions),
            }

    return asyncio.run(merge())


# ----------------------------------------------------------------------------- calibration


def _calibration_file(ctx: JobContext, store: S3ArtifactStore, workdir: Path) -> Path | None:
    calib = ctx.spec["calibration"]
    if not calib["samples"]:
        return None
    dataset = calib.get("dataset")
    if not dataset:
        ctx.log("calibration: the built-in text", samples=calib["samples"], max_length=calib["max_length"])
        return BUILTIN_CALIBRATION
    from transformers import AutoTokenizer

    raw = workdir / "calibration-source" / dataset["filename"]
    raw.parent.mkdir(parents=True, exist_ok=True)
    store.get_file(dataset["key"], raw)
    tokenizer = AutoTokenizer.from_pretrained(workdir / "source")
    fmt = DatasetFormat(dataset["format"])
    texts = []
    for _, row in iter_rows(raw):
        messages = _conversation(row, fmt)
        if tokenizer.chat_template:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        else:
            texts.append("\n\n".join(str(m.get("content", "")) for m in messages))
        if len(texts) == calib["samples"]:
            break
    path = workdir / "calibration.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
    ctx.log(
        "calibration: dataset rendered with the chat template",
        dataset=dataset["name"],
        samples=len(texts),
        chat_template=bool(tokenizer.chat_template),
    )
    return path


def _conversation(row: dict[str, Any], fmt: DatasetFormat) -> list[dict[str, Any]]:
    if fmt == DatasetFormat.PREFERENCE:
        pref = to_preference(row, fmt)
        return pref["prompt"] + pref["chosen"]
    if fmt == DatasetFormat.KTO:
        kto = to_kto(row)
        return kto["prompt"] + kto["completion"]
    return to_messages(row, fmt)


# ----------------------------------------------------------------------------- the quantizer process


def _quant_env(spec: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("YARD_JOB_S3")}
    threads = str(spec.get("omp_num_threads") or 1)
    env.update(
        OMP_NUM_THREADS=threads,
        MKL_NUM_THREADS=threads,
        # GPTQModel 7.6 on CPU: its model-loader pool asks for 2 workers and fails below that.
        GPTQMODEL_CPU_WORKERS=str(max(2, int(threads))),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONPATH=str(PROJECT_ROOT),
        PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1",
    )
    env.pop("VIRTUAL_ENV", None)
    return env


def _run_process(
    ctx: JobContext, argv: list[str], env: dict[str, str], span: tuple[float, float], log_path: Path
) -> dict[str, Any]:
    """Run a helper process (in the job's workdir) that reports JSON events on an inherited fd; relay them; its
    ``result`` event."""
    read_fd, write_fd = os.pipe()
    tail: deque[str] = deque(maxlen=40)
    with open(log_path, "w", encoding="utf-8") as log_file:
        proc = subprocess.Popen(
            [*argv, str(write_fd)],
            env=env,
            cwd=log_path.parent,  # GPTQModel writes logs/ into its working directory
            pass_fds=(write_fd,),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        os.close(write_fd)

        def drain() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                tail.append(line.rstrip())

        output = threading.Thread(target=drain, daemon=True)
        output.start()
        result: dict[str, Any] | None = None
        refusal: dict[str, Any] | None = None
        with os.fdopen(read_fd, encoding="utf-8") as events:
            for line in events:
                event = json.loads(line)
                kind = event.pop("t")
                if kind == "log":
                    ctx.log(event["message"], **event.get("data", {}))
                elif kind == "progress":
                    lo, hi = span
                    ctx.progress(fraction=round(lo + (hi - lo) * event["fraction"], 4))
                elif kind == "result":
                    result = event
                elif kind == "error":
                    refusal = event
        rc = proc.wait()
        output.join(timeout=10)
    if refusal is not None:
        raise FailedPrecondition(refusal["message"], reason=refusal["reason"])
    if rc != 0 or result is None:
        last = next((line for line in reversed(tail) if line.strip()), "")
        raise Internal(
            f"{argv[2] if len(argv) > 2 else argv[0]} exited with {rc}: {last[-500:]}",
            reason="QUANTIZER_FAILED",
            metadata={"log": str(log_path)},
        )
    return result


def _run_quantizer(ctx: JobContext, workdir: Path, out: Path, calibration: Path | None) -> dict[str, Any]:
    spec = ctx.spec
    python = Path(spec["quant_venv"]) / "bin" / "python"
    if not python.exists():
        raise FailedPrecondition(
            f"the quantizers' virtualenv is missing ({python}); `make engine-quant`", reason="QUANTIZER_NOT_INSTALLED"
        )
    if out.exists():  # a previous attempt's partial output
        for f in out.iterdir():
            f.unlink()
    config = {
        "source_dir": str(workdir / "source"),
        "output_dir": str(out),
        "work_dir": str(workdir),
        "method": spec["method"],
        "backend": spec["backend"],
        "bits": spec["bits"],
        "group_size": spec["group_size"],
        "calibration_file": str(calibration) if calibration else None,
        "samples": spec["calibration"]["samples"],
        "max_length": spec["calibration"]["max_length"],
        "heldout_file": str(HELDOUT),
        "eval_tokens": spec["eval_tokens"],
        "eval_seq_len": spec["eval_seq_len"],
        "prompt": PROMPT,
    }
    cfg_path = workdir / "quantizer.json"
    cfg_path.write_text(json.dumps(config, indent=1))
    return _run_process(
        ctx,
        [str(python), "-m", "services.quantization.quantizer", str(cfg_path)],
        _quant_env(spec),
        QUANTIZER_SPAN,
        workdir / "quantizer.log",
    )


def _vllm_check(ctx: JobContext, workdir: Path, out: Path) -> dict[str, Any]:
    spec = ctx.spec
    python = Path(spec["vllm_venv"]) / "bin" / "python"
    if not python.exists():
        return {}
    env = _quant_env(spec)
    # vLLM puts its IPC sockets in TMPDIR: a short path (a job's workdir can pass the 107-byte socket limit).
    with tempfile.TemporaryDirectory(prefix="yard-vllm-") as tmp:
        env.update(
            VLLM_CPU_KVCACHE_SPACE="1",
            VLLM_CACHE_ROOT=str(workdir / "vllm-cache"),
            TMPDIR=tmp,
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        ctx.log("loading the result in vLLM", model=str(out))
        result = _run_process(
            ctx,
            [
                str(python),
                "-m",
                "services.quantization.vllm_check",
                str(out),
                str(workdir / "source_top1.json"),
                json.dumps(PROMPT),
            ],
            env,
            (0.85, 0.88),
            workdir / "vllm_check.log",
        )
    ctx.log(
        "vLLM check",
        answer=result.get("answer"),
        perplexity=result.get("quantized_perplexity"),
        top1_agreement=result.get("top1_agreement"),
    )
    # Scores from transformers (the source's engine) are kept where the quantizer made them; vLLM's fill in
    # where transformers could not load the result.
    scores = {k: v for k, v in result.items() if k in ("quantized_perplexity", "top1_agreement")}
    return scores | {"verified_with": "vllm", "vllm_answer": result.get("answer", "")}


# ----------------------------------------------------------------------------- size check


def _weights_size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*.safetensors"))


def _check_size(spec: dict[str, Any], size: int) -> None:
    """The output must be about as small as the method promises: never ship an unquantized model."""
    expected, source = spec["expected_size_bytes"], spec["source_size_bytes"]
    if size == 0:
        raise Internal("the quantizer wrote no safetensors weights", reason="QUANTIZED_OUTPUT_MISSING")
    if size > expected * SIZE_SLACK + 16384 or size >= source:
        raise FailedPrecondition(
            f"the quantized weights take {size} bytes: expected about {expected} for {spec['method']} "
            f"{spec['bits']}-bit from a {source}-byte source; the output is not (fully) quantized, nothing registered",
            reason="QUANTIZED_SIZE_UNEXPECTED",
            metadata={"size_bytes": str(size), "expected_bytes": str(expected), "source_bytes": str(source)},
        )


if __name__ == "__main__":  # pragma: no cover - run as a job kind, not as a script
    sys.exit("run through the job worker: services.quantization.job:run_quantization")
