"""Validation and inspection of a model folder, from its files only (no weights loaded).

The parameter count is the sum of tensor element counts in the safetensors headers; a header
that does not parse, or promises more bytes than the file holds (a truncated download), is an
InvalidArgument naming the file. It covers every tensor, so a vision-language model's count includes its
vision tower and projector.

A vision-language model (a ``vision_config`` in config.json) gets ``vision`` metadata and must carry its
image processor config (``preprocessor_config.json``): without it the model can neither be served nor
trained on images, so the import is refused naming the file.
"""

from __future__ import annotations

import json
import math
import struct
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from services.core.errors import FieldViolation, InvalidArgument
from services.core.vision import vision_info

from .records import ModelFormat, ModelKind

_MAX_HEADER_BYTES = 100 * 1024 * 1024
_SAFETENSORS_DTYPES = {
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "F8_E4M3": "float8_e4m3fn",
    "F8_E5M2": "float8_e5m2", "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8",
    "BOOL": "bool",
}
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model", "vocab.txt")
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_QUANT_FORMATS = {"awq": ModelFormat.AWQ, "gptq": ModelFormat.GPTQ, "compressed-tensors": ModelFormat.COMPRESSED_TENSORS}


@dataclass
class ModelMetadata:
    architecture: str = ""
    model_type: str = ""
    parameter_count: int = 0
    dtype: str = ""
    context_length: int = 0
    has_chat_template: bool = False
    total_size_bytes: int = 0
    task: str = ""  # text-generation | embedding | "" (see _inspect_task)
    embedding_dimensions: int = 0
    # A vision-language model's vision side (the proto VisionMetadata's fields); None for a text-only model.
    vision: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> ModelMetadata:
        return cls(**{k: v for k, v in doc.items() if k in cls.__dataclass_fields__})


def _invalid(rel: str, description: str, reason: str) -> InvalidArgument:
    return InvalidArgument(
        f"{rel}: {description}", reason=reason, metadata={"file": rel},
        violations=[FieldViolation(f"files[{rel}]", description)],
    )


def read_safetensors_header(path: Path, rel: str | None = None) -> dict[str, dict[str, Any]]:
    """Tensor entries (name -> {dtype, shape, data_offsets}) of a safetensors file, checked
    against the file size so a truncated file is caught without reading its data."""
    rel = rel or path.name
    size = path.stat().st_size
    if size < 8:
        raise _invalid(rel, f"truncated safetensors file ({size} bytes, not even a header length)",
                       "SAFETENSORS_TRUNCATED")
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        if n > _MAX_HEADER_BYTES:
            raise _invalid(rel, f"not a safetensors file (header length {n} is implausible)", "SAFETENSORS_INVALID")
        if 8 + n > size:
            raise _invalid(rel, f"truncated safetensors file: header needs {n} bytes, file has {size - 8}",
                           "SAFETENSORS_TRUNCATED")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise _invalid(rel, f"safetensors header is not valid JSON: {exc}", "SAFETENSORS_INVALID") from None
    if not isinstance(header, dict):
        raise _invalid(rel, "safetensors header is not a JSON object", "SAFETENSORS_INVALID")
    tensors = {k: v for k, v in header.items() if k != "__metadata__"}
    end = 0
    for name, t in tensors.items():
        try:
            begin, stop = t["data_offsets"]
            shape = [int(d) for d in t["shape"]]
            t["dtype"]
        except (KeyError, TypeError, ValueError):
            raise _invalid(rel, f"tensor {name!r} has no valid dtype/shape/data_offsets", "SAFETENSORS_INVALID") from None
        if stop < begin or any(d < 0 for d in shape):
            raise _invalid(rel, f"tensor {name!r} has invalid offsets or shape", "SAFETENSORS_INVALID")
        end = max(end, stop)
    if 8 + n + end > size:
        raise _invalid(rel, f"truncated safetensors file: tensors need {8 + n + end} bytes, file has {size}",
                       "SAFETENSORS_TRUNCATED")
    return tensors


def detect_format(folder: Path) -> tuple[ModelKind, ModelFormat]:
    """Kind and format of a model folder, from its file names and config."""
    if (folder / "adapter_config.json").is_file():
        return ModelKind.ADAPTER, ModelFormat.PEFT_ADAPTER
    config = _read_json(folder, "config.json") if (folder / "config.json").is_file() else {}
    quant = (config.get("quantization_config") or {}).get("quant_method", "") if isinstance(config, dict) else ""
    if quant in _QUANT_FORMATS:
        return ModelKind.QUANTIZED, _QUANT_FORMATS[quant]
    if not list(folder.rglob("*.safetensors")) and list(folder.glob("*.gguf")):
        return ModelKind.QUANTIZED, ModelFormat.GGUF
    return ModelKind.BASE, ModelFormat.SAFETENSORS


def _read_json(folder: Path, rel: str) -> dict[str, Any]:
    try:
        doc = json.loads((folder / rel).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid(rel, f"not valid JSON: {exc}", "CONFIG_INVALID") from None
    if not isinstance(doc, dict):
        raise _invalid(rel, "must be a JSON object", "CONFIG_INVALID")
    return doc


def _check_config_loads(folder: Path) -> None:
    from transformers import AutoConfig

    try:
        AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the config is unusable
        raise _invalid("config.json", f"does not load with AutoConfig: {exc}", "CONFIG_INVALID") from None


def _chat_template_present(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    if (folder / "tokenizer_config.json").is_file():
        try:
            doc = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
        except ValueError:
            return False
        return bool(isinstance(doc, dict) and doc.get("chat_template"))
    return False


def validate_and_inspect(folder: Path, fmt: ModelFormat) -> ModelMetadata:
    """Check a folder is a usable model of format ``fmt`` and return its metadata.

    Full models need config.json (loading with AutoConfig), weights whose headers parse and a
    tokenizer; adapters need adapter_config.json and adapter weights.
    """
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    if not files:
        raise InvalidArgument.for_field("source_uri", "the model folder is empty", reason="MODEL_EMPTY")
    meta = ModelMetadata(total_size_bytes=sum(p.stat().st_size for p in files))
    if fmt is ModelFormat.GGUF:
        return _inspect_gguf(folder, meta)
    if fmt is ModelFormat.PEFT_ADAPTER:
        adapter = _read_json(folder, "adapter_config.json")
        meta.model_type = str(adapter.get("peft_type", "")).lower()
        meta.architecture = str(adapter.get("base_model_name_or_path") or "")
    else:
        if not (folder / "config.json").is_file():
            raise _invalid("config.json", "missing: a model folder needs config.json", "CONFIG_MISSING")
        config = _read_json(folder, "config.json")
        _check_config_loads(folder)
        archs = config.get("architectures") or []
        meta.architecture = str(archs[0]) if archs else ""
        meta.model_type = str(config.get("model_type", ""))
        text: dict[str, Any] = config["text_config"] if isinstance(config.get("text_config"), dict) else {}
        for key in _CONTEXT_KEYS:
            value = config.get(key) or text.get(key)
            if isinstance(value, int) and value > 0:
                meta.context_length = value
                break
        if not any((folder / name).is_file() for name in _TOKENIZER_FILES):
            raise _invalid("tokenizer.json", f"missing: no tokenizer file ({', '.join(_TOKENIZER_FILES)})",
                           "TOKENIZER_MISSING")
        meta.has_chat_template = _chat_template_present(folder)
        meta.dtype = str(config.get("dtype") or config.get("torch_dtype") or "")
        _inspect_task(folder, config, meta)
        meta.vision = _inspect_vision(folder, config)
    weights = [p for p in files if p.suffix == ".safetensors"]
    if not weights:
        if any(p.suffix in (".bin", ".pt", ".pth") for p in files):
            raise _invalid("model.safetensors", "missing: only pickle weights (.bin/.pt) were found; "
                           "convert them to safetensors", "WEIGHTS_MISSING")
        raise _invalid("model.safetensors", "missing: no *.safetensors weights", "WEIGHTS_MISSING")
    dtypes: Counter[str] = Counter()
    for path in weights:
        for t in read_safetensors_header(path, path.relative_to(folder).as_posix()).values():
            count = math.prod(t["shape"])
            meta.parameter_count += count
            dtypes[str(t["dtype"])] += count
    if dtypes:
        raw = dtypes.most_common(1)[0][0]
        meta.dtype = _SAFETENSORS_DTYPES.get(raw, raw.lower())
    return meta


_GENERATIVE_SUFFIXES = ("ForCausalLM", "ForConditionalGeneration", "LMHeadModel")
_PROCESSOR_CONFIG = "preprocessor_config.json"


def _inspect_vision(folder: Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """The vision metadata of a vision-language model (None for a text-only one); its image processor
    config must be there."""
    info = vision_info(folder, config)
    if info is None:
        return None
    if not (folder / _PROCESSOR_CONFIG).is_file():
        raise _invalid(_PROCESSOR_CONFIG, f"missing: {info.architecture or 'this model'} is a vision-language model "
                       f"and needs its image processor config ({_PROCESSOR_CONFIG}) to be served or trained on images; "
                       "import the full hub folder", "PROCESSOR_MISSING")
    _read_json(folder, _PROCESSOR_CONFIG)
    return {
        "vision_model_type": info.vision_model_type, "depth": info.vision_depth,
        "hidden_size": info.vision_hidden_size, "patch_size": info.patch_size,
        "spatial_merge_size": info.spatial_merge_size, "image_token": info.image_token,
        "processor_files": list(info.processor_files),
    }


def _inspect_task(folder: Path, config: dict[str, Any], meta: ModelMetadata) -> None:
    """``text-generation`` for a causal LM; ``embedding`` for a sentence-transformers folder (modules.json)
    or a bare encoder (every architecture ``...Model``, e.g. BertModel), with its vector length (the
    Pooling/Dense configs, else hidden_size) and, where sentence_bert_config.json caps it, the tokens an
    input is cut to as its context length."""
    archs = [a for a in config.get("architectures") or [] if isinstance(a, str)]
    if any(a.endswith(_GENERATIVE_SUFFIXES) for a in archs):
        meta.task = "text-generation"
        return
    st = (folder / "modules.json").is_file()
    if not st and not (archs and all(a.endswith("Model") for a in archs)):
        return
    meta.task = "embedding"
    hidden = config.get("hidden_size") or config.get("d_model") or 0
    meta.embedding_dimensions = int(hidden) if isinstance(hidden, int) else 0
    if not st:
        return
    modules = _read_json_list(folder, "modules.json")
    for module in modules:
        path = str(module.get("path") or "") if isinstance(module, dict) else ""
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        conf = folder / path / "config.json"
        if not path or not conf.is_file():
            continue
        doc = _read_json(folder, f"{path}/config.json")
        if kind.endswith("Pooling"):
            dim = doc.get("embedding_dimension") or doc.get("word_embedding_dimension")
            modes = doc.get("pooling_mode")
            count = len(modes) if isinstance(modes, list) else 1 if modes else \
                sum(1 for k, v in doc.items() if k.startswith("pooling_mode_") and v is True) or 1
            if isinstance(dim, int) and dim > 0:
                meta.embedding_dimensions = dim * count
        elif kind.endswith("Dense") and isinstance(doc.get("out_features"), int):
            meta.embedding_dimensions = doc["out_features"]
    if (folder / "sentence_bert_config.json").is_file():
        cap = _read_json(folder, "sentence_bert_config.json").get("max_seq_length")
        if isinstance(cap, int) and cap > 0:
            meta.context_length = min(meta.context_length, cap) if meta.context_length else cap


def _read_json_list(folder: Path, rel: str) -> list[Any]:
    try:
        doc = json.loads((folder / rel).read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise _invalid(rel, f"not valid JSON: {exc}", "CONFIG_INVALID") from None
    if not isinstance(doc, list):
        raise _invalid(rel, "must be a JSON list of modules", "CONFIG_INVALID")
    return doc


def _inspect_gguf(folder: Path, meta: ModelMetadata) -> ModelMetadata:
    from gguf import GGUFReader

    path = next(folder.glob("*.gguf"))
    try:
        reader = GGUFReader(str(path))
    except Exception as exc:  # noqa: BLE001 - a corrupt file surfaces as any exception
        raise _invalid(path.name, f"not a readable GGUF file: {exc}", "GGUF_INVALID") from None
    field = reader.fields.get("general.architecture")
    arch = bytes(field.parts[field.data[0]]).decode() if field else ""
    meta.model_type = arch
    ctx = reader.fields.get(f"{arch}.context_length")
    meta.context_length = int(ctx.parts[ctx.data[0]][0]) if ctx else 0
    meta.has_chat_template = "tokenizer.chat_template" in reader.fields
    meta.parameter_count = sum(int(t.n_elements) for t in reader.tensors)
    meta.dtype = "gguf"
    return meta
