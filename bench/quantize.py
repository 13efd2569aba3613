"""Quantization methods side by side on SmolLM2-135M-Instruct: cost, size, quality and vLLM decode speed.

One row per method (plus the source): the job's wall time, the quantizer's peak RSS, the weights'
size on disk vs the source, the source's and the quantized model's perplexity on the service's
held-out text (and the delta), top-1 next-token agreement with the source, and vLLM decode tokens/s
at concurrency 1 and 16 of the quantized model vs the source, measured in the same run.

It starts what it needs: a nanio S3 server (``cli/s3server.py``), the registry, training and
quantization services in-process on loopback (real gRPC, real job children running the quantizers
of ``.venv-quant``), imports SmolLM2, runs one quantization job per method with the service's
calibration defaults (unless ``--samples`` / ``--seq-len`` say otherwise), then starts vLLM's own
OpenAI server from ``.venv-vllm`` (eager mode, bf16, as the inference service runs it) on the source
folder and on each downloaded output, one at a time, and measures streamed decode tokens/s with the
client of ``bench/gateway_overhead.py``. An output vLLM cannot load gets a row that says so with the
error's first line; a job that fails gets a row with its error.

    .venv/bin/python bench/quantize.py                          # every method
    .venv/bin/python bench/quantize.py --methods gptq,w8a8 --no-vllm
    .venv/bin/python bench/quantize.py --json /tmp/quantize.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from gateway_overhead import HOST, VLLM_PYTHON, _free_ports, level  # noqa: E402

# name -> (method enum name, backend enum name, label)
METHODS: dict[str, tuple[str, str, str]] = {
    "gptq": ("GPTQ", "LLM_COMPRESSOR", "W4A16 gptq, llm-compressor"),
    "awq": ("AWQ", "LLM_COMPRESSOR", "W4A16 awq, llm-compressor"),
    "w8a8": ("W8A8_INT8", "LLM_COMPRESSOR", "W8A8 int8, llm-compressor"),
    "int8": ("INT8_WEIGHT_ONLY", "LLM_COMPRESSOR", "W8A16 int8, llm-compressor"),
    "fp8": ("FP8_DYNAMIC", "LLM_COMPRESSOR", "FP8 dynamic, llm-compressor"),
    "gptq-gptqmodel": ("GPTQ", "GPTQMODEL", "W4A16 gptq, gptqmodel"),
    "awq-autoawq": ("AWQ", "AUTOAWQ", "W4A16 awq, autoawq"),
}
CALIBRATED = {"GPTQ", "AWQ", "W8A8_INT8"}
MIB = 1 << 20


@dataclass
class Row:
    method: str
    label: str
    status: str = "ok"  # ok | job failed | vllm failed
    wall_s: float | None = None
    quantize_s: float | None = None  # the quantizing library alone (no loading, scoring or checks)
    verified_with: str = ""
    peak_rss_bytes: int | None = None
    size_bytes: int | None = None
    source_size_bytes: int | None = None
    source_perplexity: float | None = None
    quantized_perplexity: float | None = None
    perplexity_delta: float | None = None
    top1_agreement: float | None = None
    group_size: int | None = None
    model_version: str = ""
    tokens_per_s: dict[int, float] = field(default_factory=dict)
    error: str = ""
    output_dir: str = ""


def first_line(text: str) -> str:
    return next((line.strip() for line in text.splitlines() if line.strip()), text.strip())


# ----------------------------------------------------------------------------- the stack


@asynccontextmanager
async def stack(data_dir: Path, threads: int) -> AsyncIterator[Any]:
    """nanio + registry + training + quantization (the service's settings, on port 0)."""
    from cli.s3server import start_s3_server
    from modelyard.client import QuantizationClient
    from services.core.settings import GrpcServerSettings, S3Settings
    from services.quantization.app import build_app
    from services.quantization.settings import QuantizationSettings
    from tests.support.quantization_stack import QuantStack
    from tests.support.training_stack import training_stack

    server = start_s3_server(data_dir / "s3")
    try:
        s3 = S3Settings(endpoint=server.endpoint, access_key=server.access_key, secret_key=server.secret_key,
                        bucket=f"bench-{uuid.uuid4().hex[:8]}")
        async with training_stack(data_dir, s3) as trio:
            settings = QuantizationSettings(
                data_dir=data_dir / "quantization", s3=s3, grpc=GrpcServerSettings(port=0),
                registry_addr=trio.app.settings.registry_addr, training_addr=trio.training_addr,
                worker_poll_interval_s=0.1, heartbeat_s=0.5, heartbeat_timeout_s=30, omp_num_threads=threads)
            app = build_app(settings, metrics=False, default_port=0)
            await app.start()
            client = QuantizationClient(app.server.address, timeout=120)
            try:
                yield QuantStack(trio.registry, trio.training, client, app.server.address,
                                 settings.registry_addr, app), s3
            finally:
                await client.close()
                await app.stop(grace=1)
    finally:
        server.stop()


async def run_job(q: Any, s3: Any, base: str, name: str, args: argparse.Namespace, out_root: Path) -> Row:
    from modelyard.client import DomainError
    from modelyard.common.v1 import common_pb2 as cpb
    from modelyard.quantization.v1 import quantization_pb2 as qpb
    from services.core.artifacts import S3ArtifactStore

    method, backend, label = METHODS[name]
    row = Row(name, label)
    spec = qpb.QuantizationJobSpec(source_model_version=base, method=getattr(qpb, f"QUANTIZATION_METHOD_{method}"),
                                   backend=getattr(qpb, f"QUANTIZATION_BACKEND_{backend}"),
                                   output_model=f"models/smollm2-{name}")
    if method in CALIBRATED:
        spec.calibration_samples = args.samples
        spec.calibration_max_length = args.seq_len
    print(f"[{name}] quantizing ({label}) ...", flush=True)
    started = time.monotonic()
    try:
        job = await q.quantization.create_quantization_job(qpb.QuantizationJob(display_name=f"bench {name}", spec=spec))
    except DomainError as e:
        row.status, row.error = "job refused", first_line(str(e))
        return row
    row.group_size = job.spec.group_size
    terminal = {cpb.JOB_STATE_SUCCEEDED, cpb.JOB_STATE_FAILED, cpb.JOB_STATE_CANCELLED}
    deadline = started + args.job_timeout
    while job.state not in terminal:
        if time.monotonic() > deadline:
            await q.quantization.cancel_quantization_job(job.name)
            row.status, row.error = "job failed", f"still running after {args.job_timeout}s (cancelled)"
            return row
        await asyncio.sleep(1.0)
        job = await q.quantization.get_quantization_job(job.name)
    record = await asyncio.to_thread(q.app.jobs.store.get, job.name)
    row.wall_s = (record.finished_at - record.started_at).total_seconds() if record.started_at and \
        record.finished_at else time.monotonic() - started
    if job.state != cpb.JOB_STATE_SUCCEEDED:
        row.status = "job failed"
        row.error = first_line((record.error or {}).get("message") or job.error.message or str(job.state))
        print(f"[{name}] FAILED after {row.wall_s:.0f}s: {row.error}", flush=True)
        return row
    out = record.outputs
    quality = out.get("quality") or {}
    row.peak_rss_bytes = out.get("peak_rss_bytes")
    row.quantize_s, row.verified_with = out.get("quantize_seconds"), out.get("verified_with", "")
    row.size_bytes, row.source_size_bytes = out.get("size_bytes"), out.get("source_size_bytes")
    row.source_perplexity = quality.get("source_perplexity")
    row.quantized_perplexity = quality.get("quantized_perplexity")
    row.perplexity_delta = quality.get("perplexity_delta")
    row.top1_agreement = quality.get("top1_agreement")
    row.model_version = out["model_version"]
    print(f"[{name}] done in {row.wall_s:.0f}s: {row.model_version}, ppl {row.quantized_perplexity}", flush=True)
    if not args.no_vllm:
        version = await q.registry.get_model_version(row.model_version)
        dest = out_root / name
        await asyncio.to_thread(S3ArtifactStore.connect(s3).download_dir, version.artifact_prefix, dest)
        row.output_dir = str(dest)
    return row


# ----------------------------------------------------------------------------- vLLM


_ERROR_RE = re.compile(r"^(\w+\.)*\w*(Error|Exception|Exit)\b.*:")


def vllm_error(log: str) -> str:
    """The first line of the error that stopped vLLM: the last ``SomethingError: ...`` line of its log."""
    lines = [line.strip() for line in log.splitlines() if line.strip()]
    for line in reversed(lines):
        text = re.sub(r"^\(\w+ pid=\d+\)\s*", "", line)  # vLLM's "(EngineCore_0 pid=123)" prefix
        text = re.sub(r"^(ERROR|WARNING|INFO) [\d\- :]+\[[^\]]*\]\s*", "", text)
        if _ERROR_RE.match(text) and "root cause" not in text:
            return text
    return lines[-1] if lines else "vLLM exited without output"


@contextmanager
def vllm_server(model_dir: Path, workdir: Path, max_num_seqs: int, timeout: float,
                logs: Path | None = None) -> Iterator[str]:
    """vLLM's OpenAI server on ``model_dir`` (the inference service's command line and environment);
    its URL once it answers, RuntimeError with the error's first line when it cannot load the model."""
    port = _free_ports(1)[0]
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CACHE_ROOT": str(workdir / "vllm-cache"),
           "TMPDIR": str(workdir / "tmp"), "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1",
           "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
    env.pop("VIRTUAL_ENV", None)
    cmd = [str(VLLM_PYTHON), "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir), "--host", HOST,
           "--port", str(port), "--served-model-name", "bench", "--dtype", "bfloat16", "--enforce-eager",
           "--max-model-len", "1024", "--max-num-seqs", str(max_num_seqs), "--uvicorn-log-level", "warning"]
    log_path = workdir / "vllm.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                cwd=workdir, start_new_session=True)
    url = f"http://{HOST}:{port}"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(vllm_error(log_path.read_text(errors="replace")))
            try:
                if httpx.get(f"{url}/v1/models", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"vLLM did not answer within {timeout:.0f}s")
            time.sleep(1.0)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()
        if logs:
            logs.mkdir(parents=True, exist_ok=True)
            (logs / f"vllm-{workdir.name}.log").write_bytes(log_path.read_bytes())


def measure_vllm(row: Row, model_dir: Path, workdir: Path, args: argparse.Namespace) -> None:
    print(f"[{row.method}] vLLM decode tokens/s ...", flush=True)
    try:
        with vllm_server(model_dir, workdir, max(args.concurrency), args.vllm_timeout, args.logs) as url:
            for c in args.concurrency:
                result = asyncio.run(level(url, "bench", {}, c, c * args.requests_per_stream, args.max_tokens))
                if result["counts"] != [args.max_tokens]:
                    raise RuntimeError(f"token counts {result['counts']} != max_tokens {args.max_tokens}")
                row.tokens_per_s[c] = result["tokens_per_s"]
                print(f"[{row.method}]   concurrency {c}: {result['tokens_per_s']:.1f} tok/s", flush=True)
    except Exception as e:  # noqa: BLE001 - the row says why; the bench goes on
        row.status = "vllm failed"
        row.error = first_line(str(e)) or type(e).__name__
        print(f"[{row.method}] vLLM could not run it: {row.error}", flush=True)


# ----------------------------------------------------------------------------- the table


def _f(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table(rows: list[Row], source: Row, concurrency: list[int]) -> str:
    head = (f"{'method':<16} {'status':<11} {'group':>5} {'wall s':>7} {'quant s':>7} {'checked':>12} "
            f"{'peak RSS MiB':>12} {'size MiB':>9} "
            f"{'ratio':>6} {'src ppl':>8} {'q ppl':>8} {'Δ ppl':>7} {'top-1':>6}")
    for c in concurrency:
        head += f" {f'tok/s c{c} (x src)':>20}"
    lines = [head, "-" * len(head)]
    notes = []
    for r in [source, *rows]:
        size = r.size_bytes if r.size_bytes is not None else None
        ratio = size / r.source_size_bytes if size and r.source_size_bytes else None
        line = (f"{r.method:<16} {r.status:<11} {r.group_size if r.group_size else '-':>5} {_f(r.wall_s, '.0f'):>7} "
                f"{_f(r.quantize_s, '.0f'):>7} {r.verified_with or '-':>12} "
                f"{_f(r.peak_rss_bytes / MIB if r.peak_rss_bytes else None, '.0f'):>12} "
                f"{_f(size / MIB if size else None, '.1f'):>9} {_f(ratio, '.3f'):>6} {_f(r.source_perplexity, '.3f'):>8} "
                f"{_f(r.quantized_perplexity, '.3f'):>8} {_f(r.perplexity_delta, '+.3f'):>7} "
                f"{_f(r.top1_agreement, '.3f'):>6}")
        for c in concurrency:
            tps = r.tokens_per_s.get(c)
            base = source.tokens_per_s.get(c)
            cell = "-" if tps is None else f"{tps:.1f}" + (f" ({tps / base:.2f}x)" if base and r is not source else "")
            line += f" {cell:>20}"
        lines.append(line)
        if r.error:
            notes.append(f"  {r.method}: {r.status}: {r.error}")
    if notes:
        lines += ["", "errors:", *notes]
    return "\n".join(lines)


async def quantize_all(args: argparse.Namespace, tmp: Path) -> tuple[Row, list[Row]]:
    from cli.demo_models import build_smollm2
    from tests.support.training_stack import import_model

    folder = build_smollm2()
    async with stack(tmp / "yard", args.threads) as (q, s3):
        print(f"importing {folder} ...", flush=True)
        base = await import_model(q.registry, folder, parent="models/smollm2", version_id="base")
        rows = [await run_job(q, s3, base, name, args, tmp / "outputs") for name in args.methods]
    source = Row("source", "the source model", group_size=None)
    source.size_bytes = sum(f.stat().st_size for f in folder.rglob("*.safetensors"))
    source.source_size_bytes = source.size_bytes
    ppl = next((r.source_perplexity for r in rows if r.source_perplexity is not None), None)
    source.source_perplexity = source.quantized_perplexity = ppl
    source.output_dir = str(folder)
    return source, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated, from: {', '.join(METHODS)} (default: all)")
    parser.add_argument("--samples", type=int, default=64, help="calibration samples (calibrated methods)")
    parser.add_argument("--seq-len", type=int, default=512, help="calibration max length in tokens")
    parser.add_argument("--no-vllm", action="store_true", help="skip the vLLM decode measurements")
    parser.add_argument("--json", type=Path, help="also write the figures as JSON here")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="quantizer OMP threads")
    parser.add_argument("--concurrency", default="1,16", help="vLLM concurrency levels")
    parser.add_argument("--requests-per-stream", type=int, default=2, help="vLLM requests per concurrent stream")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens generated per vLLM request")
    parser.add_argument("--logs", type=Path, help="keep each vLLM server's log in this folder")
    parser.add_argument("--job-timeout", type=float, default=3600, help="seconds a quantization job may take")
    parser.add_argument("--vllm-timeout", type=float, default=900, help="seconds vLLM may take to start")
    args = parser.parse_args()
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    if not args.no_vllm and not VLLM_PYTHON.is_file():
        parser.error(f"no vLLM engine ({VLLM_PYTHON}): `make engine-vllm`, or pass --no-vllm")

    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="yard-bench-quantize-") as tmp_name:
        tmp = Path(tmp_name)
        source, rows = asyncio.run(quantize_all(args, tmp))
        if not args.no_vllm:
            measure_vllm(source, Path(source.output_dir), tmp / "vllm" / "source", args)
            for r in rows:
                if r.output_dir:
                    measure_vllm(r, Path(r.output_dir), tmp / "vllm" / r.method, args)
    print()
    print(f"SmolLM2-135M-Instruct, {args.samples} calibration samples x {args.seq_len} tokens, {args.threads} threads; "
          + ("no vLLM" if args.no_vllm else f"vLLM eager bf16 decode, {args.max_tokens} tokens per request, "
             f"{args.requests_per_stream} requests per stream") + f"; {time.monotonic() - started:.0f}s in all")
    print(table(rows, source, args.concurrency), flush=True)
    if args.json:
        args.json.write_text(json.dumps({"args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                                         "rows": [asdict(r) for r in [source, *rows]]}, indent=1))


if __name__ == "__main__":
    main()
