"""Merge a PEFT adapter into its base model (``output.merge`` of a job, and the MergeAdapter RPC)."""

from __future__ import annotations

import shutil
from pathlib import Path

from services.core.errors import InvalidArgument
from services.core.vision import PROCESSOR_FILES, vision_info

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                    "tokenizer.model", "chat_template.jinja", "added_tokens.json", "generation_config.json")


def merge_adapter(base_dir: Path | str, adapter_dir: Path | str, out_dir: Path | str) -> Path:
    """Load ``base_dir`` (fp32; a vision-language model as one) with the adapter of ``adapter_dir``, merge it into the weights
    (peft ``merge_and_unload``) and save a plain model (safetensors) plus the tokenizer to ``out_dir``."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir, adapter_dir, out_dir = Path(base_dir), Path(adapter_dir), Path(out_dir)
    if not (adapter_dir / "adapter_config.json").is_file():
        raise InvalidArgument.for_field("adapter", f"{adapter_dir} holds no adapter_config.json", reason="NOT_AN_ADAPTER")
    if not (base_dir / "config.json").is_file():
        raise InvalidArgument.for_field("base_model", f"{base_dir} holds no config.json", reason="NOT_A_MODEL")
    vision = vision_info(base_dir) is not None
    if vision:
        from transformers import AutoModelForImageTextToText as model_cls
    else:
        model_cls = AutoModelForCausalLM
    model = model_cls.from_pretrained(base_dir, dtype=torch.float32)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    # a VLM also needs its processor files (image processor config, chat template) to serve and register
    for name in _TOKENIZER_FILES + (PROCESSOR_FILES if vision else ()):  # the adapter folder carries the tokenizer it was trained with, else the base's
        src = adapter_dir / name if (adapter_dir / name).is_file() else base_dir / name
        if src.is_file():
            shutil.copy2(src, out_dir / name)
    return out_dir
