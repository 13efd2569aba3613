"""Image inputs: the gateway's reading of image URLs (``gateway/images.py``), the inference service's checks of
``ChatMessage.parts`` (``services/inference/protocol.py``), and the transformers engine's continuous batching
of image prompts on the real tiny Qwen2-VL (``engines/scheduler.py``)."""

from __future__ import annotations

import asyncio
import base64
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
import torch

from cli.demo_vlm import QUESTION, png_bytes, shape_image
from gateway.images import check_image, fetch_image, load_image, parse_data_url, sniff
from gateway.settings import ImageSettings
from modelyard.inference.v1 import inference_pb2 as pb
from services.core.errors import InvalidArgument
from services.inference import protocol
from services.inference.engines.scheduler import GenRequest, Sampling, Scheduler
from tests.support.vlm_model import tiny_vlm  # noqa: F401 - the fixture

pytestmark = pytest.mark.timeout(300)

PNG = png_bytes(shape_image("red", "square"))
FIELD = "messages[0].content[1].image_url.url"
SIGNATURES = {
    "image/png": b"\x89PNG\r\n\x1a\n" + b"\0" * 20,
    "image/jpeg": b"\xff\xd8\xff\xe0" + b"\0" * 20,
    "image/webp": b"RIFF\0\0\0\0WEBPVP8 " + b"\0" * 20,
    "image/gif": b"GIF89a" + b"\0" * 20,
    "image/bmp": b"BM" + b"\0" * 30,
}


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def field_error(exc: pytest.ExceptionInfo[InvalidArgument]) -> tuple[str, str]:
    return exc.value.violations[0].field, exc.value.violations[0].description


# ---------------------------------------------------------------------- gateway: data URLs


@pytest.mark.parametrize("mime", sorted(SIGNATURES))
def test_each_format_is_known_by_its_first_bytes(mime):
    assert sniff(SIGNATURES[mime]) == mime
    image = parse_data_url(f"data:{mime};base64,{b64(SIGNATURES[mime])}", FIELD, 1024)
    assert image.mime_type == mime and image.data == SIGNATURES[mime]


def test_a_png_data_url_decodes_to_its_bytes():
    image = parse_data_url(f"data:image/png;base64,{b64(PNG)}", FIELD, 10 * 1024 * 1024)
    assert image.data == PNG and image.mime_type == "image/png"
    # media type parameters and case are tolerated; image/jpg is image/jpeg
    assert parse_data_url(f"DATA:Image/PNG;charset=binary;base64,{b64(PNG)}", FIELD, 1 << 20).data == PNG
    jpeg = SIGNATURES["image/jpeg"]
    assert parse_data_url(f"data:image/jpg;base64,{b64(jpeg)}", FIELD, 1024).mime_type == "image/jpeg"


@pytest.mark.parametrize(("url", "words"), [
    ("data:image/png," + b64(PNG), "only base64 data URLs"),
    ("data:image/png;base64", "data:image/png;base64,<data>"),
    ("image/png;base64," + b64(PNG), "data:image/png;base64,<data>"),
    ("data:image/svg+xml;base64,PHN2Zy8+", "'image/svg+xml' is not an accepted image type"),
    ("data:;base64," + b64(PNG), "'(none)' is not an accepted image type"),
    ("data:image/png;base64,iVBO%%%", "invalid base64"),
    ("data:image/png;base64,iVBORw0", "invalid base64"),  # bad padding
    ("data:image/png;base64,", "the image is empty"),
    ("data:image/png;base64," + b64(b"%PDF-1.7 not an image"), "not an image of a supported format"),
    ("data:image/gif;base64," + b64(PNG), "the data URL says image/gif but the bytes are image/png"),
])
def test_bad_data_urls_are_refused_naming_the_field(url, words):
    with pytest.raises(InvalidArgument) as exc:
        parse_data_url(url, FIELD, 1 << 20)
    field, description = field_error(exc)
    assert field == FIELD and words in description, description


def test_the_size_limit_counts_decoded_bytes():
    exact = len(PNG)
    assert parse_data_url(f"data:image/png;base64,{b64(PNG)}", FIELD, exact).data == PNG
    with pytest.raises(InvalidArgument) as exc:
        parse_data_url(f"data:image/png;base64,{b64(PNG)}", FIELD, exact - 1)
    assert f"has {exact} bytes; at most {exact - 1}" in field_error(exc)[1]
    # far over: refused by the base64 length alone
    with pytest.raises(InvalidArgument) as exc:
        parse_data_url("data:image/png;base64," + "A" * 4000, FIELD, 100)
    assert "judging by its base64 length" in field_error(exc)[1]
    with pytest.raises(InvalidArgument):
        check_image(PNG, None, FIELD, exact - 1)


# ---------------------------------------------------------------------- gateway: http(s) URLs


class _Images(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        body = {"/red.png": PNG, "/big.png": PNG * 50, "/text": b"hello"}.get(self.path)
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("location", "/red.png")
            self.end_headers()
            return
        self.send_response(200 if body is not None else 404)
        self.end_headers()  # no content-length: the cap is enforced while reading
        self.wfile.write(body or b"")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(scope="module")
def image_server() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


async def test_http_urls_are_refused_unless_allowed(image_server):
    with pytest.raises(InvalidArgument) as exc:
        await load_image(f"{image_server}/red.png", FIELD, ImageSettings(), None)
    assert field_error(exc)[0] == FIELD and "images.allow_remote_urls" in field_error(exc)[1]
    for url in ("ftp://example.com/a.png", "file:///etc/passwd", "javascript:alert(1)"):
        with pytest.raises(InvalidArgument):
            await load_image(url, FIELD, ImageSettings(allow_remote_urls=True), None)


async def test_allowed_http_urls_are_fetched_with_a_byte_cap(image_server):
    settings = ImageSettings(allow_remote_urls=True, max_bytes=len(PNG) * 2, fetch_timeout_s=5)
    async with httpx.AsyncClient(follow_redirects=True, max_redirects=3) as client:
        image = await load_image(f"{image_server}/moved", FIELD, settings, client)
        assert image.data == PNG and image.mime_type == "image/png"
        for path, words in (("/big.png", "more than"), ("/text", "not an image"), ("/nothing", "HTTP 404")):
            with pytest.raises(InvalidArgument) as exc:
                await fetch_image(f"{image_server}{path}", FIELD, settings, client)
            assert field_error(exc)[0] == FIELD and words in field_error(exc)[1], field_error(exc)
        with pytest.raises(InvalidArgument) as exc:  # nothing listens there
            await fetch_image("http://127.0.0.1:9/x.png", FIELD, settings, client)
        assert "could not fetch the image" in field_error(exc)[1]


# ---------------------------------------------------------------------- inference service: parts


def _chat(*parts: pb.ContentPart, content: str = "") -> pb.ChatRequest:
    return pb.ChatRequest(messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=content, parts=list(parts))])


def test_parts_become_openai_content_with_data_urls():
    req = _chat(pb.ContentPart(text="Look: "), pb.ContentPart(image=pb.ImageInput(data=PNG, mime_type="image/png",
                                                                                   detail="low")))
    body = protocol.chat_body(req, "m")
    assert body["messages"][0]["content"] == [
        {"type": "text", "text": "Look: "},
        {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(PNG)}", "detail": "low"}}]
    assert protocol.first_image_field(req.messages) == "messages[0].parts[1].image"
    assert protocol.first_image_field(_chat(content="hi").messages) is None
    assert protocol.chat_body(_chat(content="hi"), "m")["messages"][0]["content"] == "hi"


@pytest.mark.parametrize(("req", "field"), [
    (_chat(pb.ContentPart(text="a"), content="b"), "messages[0].content"),
    (_chat(pb.ContentPart(image=pb.ImageInput(mime_type="image/png"))), "messages[0].parts[0].image.data"),
    (_chat(pb.ContentPart(text="a"), pb.ContentPart(image=pb.ImageInput(data=PNG * 3))),
     "messages[0].parts[1].image.data"),
    (_chat(pb.ContentPart(image=pb.ImageInput(data=PNG, mime_type="text/plain"))),
     "messages[0].parts[0].image.mime_type"),
    (_chat(pb.ContentPart()), "messages[0].parts[0]"),
])
def test_bad_parts_are_refused_naming_the_field(req, field):
    with pytest.raises(InvalidArgument) as exc:
        protocol.chat_body(req, "m", max_image_bytes=len(PNG) * 2)
    assert field_error(exc)[0] == field


# ---------------------------------------------------------------------- engine: image prompts in the batch


def _reference(model, ids: list[int], mm: dict[str, torch.Tensor] | None,
               steps: int) -> list[tuple[int, float]]:
    """Greedy tokens and their log-probabilities by full forwards (no cache, the model's own positions each
    time): the ground truth."""
    ids = list(ids)
    out = []
    for _ in range(steps):
        kw = dict(mm or {})
        if "mm_token_type_ids" in kw:
            pad = len(ids) - kw["mm_token_type_ids"].shape[1]
            kw["mm_token_type_ids"] = torch.cat([kw["mm_token_type_ids"], torch.zeros((1, pad), dtype=torch.long)], 1)
        logits = model(input_ids=torch.tensor([ids]), attention_mask=torch.ones((1, len(ids)), dtype=torch.long),
                       **kw).logits[0, -1]
        token = int(logits.argmax())
        out.append((token, float(torch.log_softmax(logits.float(), -1)[token])))
        ids.append(token)
    return out


async def _tokens(req: GenRequest) -> dict[int, list[tuple[int, float]]]:
    tokens: dict[int, list[tuple[int, float]]] = {}
    while True:
        event = await req.events.get()
        assert event.kind != "error", event.message
        if event.kind == "delta":
            tokens.setdefault(event.index, []).extend((t.token_id, t.logprob) for t in event.tokens)
        if event.kind == "done":
            return tokens


async def test_image_prompts_batched_with_text_prompts_get_their_reference_answers(tiny_vlm):  # noqa: F811
    from transformers import AutoModelForImageTextToText

    from services.core.vision import load_processor

    torch.manual_seed(0)
    processor = load_processor(tiny_vlm)
    model = AutoModelForImageTextToText.from_pretrained(tiny_vlm, dtype=torch.float32).eval()
    tok = processor.tokenizer

    def image_prompt(colour: str, shape: str) -> tuple[list[int], dict[str, torch.Tensor]]:
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
        text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        out = processor(text=[text], images=[shape_image(colour, shape)], return_tensors="pt")
        return out["input_ids"][0].tolist(), {k: v for k, v in out.items() if k not in ("input_ids", "attention_mask")}

    prompts = [image_prompt("red", "square"), (tok("Hello there, how are")["input_ids"], None),
               image_prompt("blue", "circle"), (tok("What colour")["input_ids"], None)]
    steps = [6, 40, 5, 3]
    with torch.no_grad():
        expected = [_reference(model, ids, mm, k) for (ids, mm), k in zip(prompts, steps, strict=True)]

    loop = asyncio.get_running_loop()
    sched = Scheduler(model, tok, max_num_seqs=8, eos_ids=set())
    sched.start()
    try:
        def submit(i: int, n: int = 1) -> GenRequest:
            ids, mm = prompts[i]
            req = GenRequest(ids, Sampling(max_tokens=steps[i], temperature=0.0, ignore_eos=True, logprobs=True), n=n,
                             loop=loop,
                             mm_inputs=mm)
            sched.submit(req)
            return req

        first = [submit(0), submit(1, n=2)]  # admitted together: one text prefill, one image prefill
        answers = [await _tokens(r) for r in first[:1]]
        late = [submit(2, n=2), submit(3)]  # join a batch that still decodes request 1
        answers += [await _tokens(r) for r in [first[1], *late]]
    finally:
        sched.stop()
    # the log-probabilities show a wrong position or cache row even where a random model's greedy token would not
    for got, want, n in zip(answers, expected, (1, 2, 2, 1), strict=True):
        assert sorted(got) == list(range(n))
        for row in got.values():
            assert [t for t, _ in row] == [t for t, _ in want]
            assert [lp for _, lp in row] == pytest.approx([lp for _, lp in want], abs=1e-4)


async def test_a_lora_adapter_on_a_vlm_answers_image_prompts_beside_the_base_model(tiny_vlm, tmp_path):  # noqa: F811
    """A PEFT LoRA of the language model's attention loads as adapters do for text models (``--lora``); image
    requests of the adapter and of the base model share one batch (peft ``adapter_names``)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    from cli.demo_vlm import data_url
    from services.inference.engines.transformers_server import TransformersEngineServer

    torch.manual_seed(0)
    base = AutoModelForImageTextToText.from_pretrained(tiny_vlm)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=r".*language_model.*\.(q_proj|v_proj)",
                      init_lora_weights=False)
    get_peft_model(base, lora).save_pretrained(tmp_path / "lora")
    engine = TransformersEngineServer(tiny_vlm, served_model_name="vlm", dtype="auto", max_model_len=0,
                                      max_num_seqs=4, loras={"tuned": str(tmp_path / "lora")})
    messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(
        shape_image("green", "triangle"))}}, {"type": "text", "text": QUESTION}]}]
    ids, mm = engine.chat_inputs(messages)
    assert mm is not None and engine.tokenizer.convert_tokens_to_ids("<|image_pad|>") in ids
    loop = asyncio.get_running_loop()

    def request(adapter: str | None) -> GenRequest:
        return GenRequest(ids, Sampling(max_tokens=4, temperature=0.0, logprobs=True, ignore_eos=True),
                          adapter=adapter, loop=loop, mm_inputs=mm)

    engine.scheduler.start()
    try:
        alone = [await _collect(engine, request(a)) for a in ("tuned", None)]
        together = await asyncio.gather(*(_collect(engine, request(a)) for a in ("tuned", None)))
    finally:
        engine.scheduler.stop()
    assert alone[0] != alone[1]  # the adapter changes the answer
    for got, want in zip(together, alone, strict=True):
        assert [t for t, _ in got[0]] == [t for t, _ in want[0]]
        assert [lp for _, lp in got[0]] == pytest.approx([lp for _, lp in want[0]], abs=1e-4)


async def _collect(engine, req: GenRequest) -> dict[int, list[tuple[int, float]]]:
    engine.scheduler.submit(req)
    return await _tokens(req)
