"""Vision-language models: what a model folder says about its vision side, and loading its processor.

Shared by the registry (inspection), training (the VLM recipe), inference (the transformers engine) and
evaluation. Nothing here imports torch or transformers at module level.

``load_processor`` is ``AutoProcessor.from_pretrained``, except that a Qwen2-VL-family processor whose video
processor cannot load (transformers' video processors need torchvision, which has no build for this
machine's CPU torch) is rebuilt for images and text only: same tokenizer, same image processor, same
chat template, so image inputs are processed exactly as the full processor would.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# Config keys that mark a vision-language model (``vision_config``: Qwen2-VL, LLaVA, Idefics, Gemma 3, ...).
_VISION_KEYS = ("vision_config", "vision_tower", "mm_vision_tower")
# The model's parts, by parameter-name prefix (after any ``model.``/``base_model.model.`` wrapper); the
# vision tower's own patch merger counts as the aligner (projector) in Qwen2-VL.
VISION_PREFIXES = ("visual.", "vision_tower.", "vision_model.")
ALIGNER_MARKERS = ("visual.merger.", "multi_modal_projector.", "mm_projector.", "connector.")
PROCESSOR_FILES = (
    "preprocessor_config.json",
    "processor_config.json",
    "chat_template.json",
    "chat_template.jinja",
    "video_preprocessor_config.json",
)


@dataclass
class VisionInfo:
    """The vision side of a model folder, from its config (no weights read)."""

    architecture: str
    model_type: str
    vision_model_type: str = ""
    vision_depth: int = 0
    vision_hidden_size: int = 0
    patch_size: int = 0
    spatial_merge_size: int = 0
    image_token: str = ""
    processor_files: tuple[str, ...] = ()


def is_vision_config(config: dict[str, Any]) -> bool:
    return any(config.get(k) for k in _VISION_KEYS)


def vision_info(folder: Path, config: dict[str, Any] | None = None) -> VisionInfo | None:
    """What ``folder``'s config.json says about its vision side; None for a text-only model."""
    folder = Path(folder)
    if config is None:
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError):
            return None
    if not is_vision_config(config):
        return None
    vc = config.get("vision_config") or {}
    archs = config.get("architectures") or [""]
    return VisionInfo(
        architecture=str(archs[0]),
        model_type=str(config.get("model_type", "")),
        vision_model_type=str(vc.get("model_type", "")),
        vision_depth=int(vc.get("depth") or vc.get("num_hidden_layers") or 0),
        vision_hidden_size=int(vc.get("embed_dim") or vc.get("hidden_size") or 0),
        patch_size=int(vc.get("patch_size") or 0),
        spatial_merge_size=int(vc.get("spatial_merge_size") or 1),
        image_token=_image_token(folder),
        processor_files=tuple(f for f in PROCESSOR_FILES if (folder / f).is_file()),
    )


def _image_token(folder: Path) -> str:
    try:
        cfg = json.loads((folder / "tokenizer_config.json").read_text())
    except (OSError, ValueError):
        return ""
    for key in ("image_token",):
        if isinstance(cfg.get(key), str):
            return cfg[key]
    added = cfg.get("added_tokens_decoder") or {}
    names = {v.get("content") for v in added.values() if isinstance(v, dict)}
    try:
        names |= {t.get("content") for t in json.loads((folder / "tokenizer.json").read_text()).get("added_tokens", [])}
    except (OSError, ValueError, AttributeError):
        pass
    for candidate in ("<|image_pad|>", "<image>", "<|image|>", "<image_soft_token>"):
        if candidate in names:
            return candidate
    return ""


def part_of(param_name: str) -> str:
    """``vision``, ``aligner`` or ``language`` for a parameter name of a VLM (PEFT-wrapped or not)."""
    name = param_name
    for wrapper in ("base_model.model.", "model."):
        if name.startswith(wrapper):
            name = name[len(wrapper) :]
    if any(m in name for m in ALIGNER_MARKERS):
        return "aligner"
    if name.startswith(VISION_PREFIXES) or any(f".{p}" in name for p in VISION_PREFIXES):
        return "vision"
    return "language"


def load_processor(folder: Path | str):
    """The model's processor (tokenizer + image processor + chat template)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(folder))
    except (ImportError, AttributeError, ValueError, TypeError, OSError) as exc:
        processor = _image_text_processor(Path(folder))
        if processor is None:
            raise exc
        return processor


def _image_text_processor(folder: Path):
    """A Qwen2-VL-family processor without its video processor (see the module's docstring)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return None
    if config.get("model_type") not in ("qwen2_vl", "qwen2_5_vl"):
        return None
    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2VLProcessor
    from transformers.processing_utils import ProcessorMixin

    class Qwen2VLImageTextProcessor(Qwen2VLProcessor):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    image_processor = AutoImageProcessor.from_pretrained(str(folder), use_fast=False)
    return Qwen2VLImageTextProcessor(image_processor, tokenizer, chat_template=tokenizer.chat_template)
