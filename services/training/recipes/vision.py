"""The vision-language (VLM) path of the SFT recipe: a base model whose config has a vision side
(:func:`services.core.vision.vision_info`) trains through its processor and chat template.

Data: an image dataset version is the uploaded archive (data file + images, extracted here) or a plain file
with inline ``data:`` images. Messages rows keep their content parts: image parts become ``{"type": "image"}``
placeholders for the chat template and their images go to the processor in order. Labels are the assistant
tokens only (spans found as in :mod:`.data`, by rendering conversation prefixes), never the image tokens.
Rows are encoded lazily per batch (images are not held in memory); a setup pass encodes every row once to
report skipped / truncated rows by number and to refuse rows with more than ``max_images_per_sample``
images. A row is truncated at ``max_length`` only after its last image token; otherwise it is skipped.

Model: ``AutoModelForImageTextToText``. ``freeze_vision_tower`` / ``freeze_aligner`` switch off the
gradients of those parts (by parameter name, :func:`services.core.vision.part_of`). LoRA adapters go on the
language model's linear layers only (``all-linear`` or the named targets, never the vision tower, the
aligner or the LM head); with LoRA an *unfrozen* vision tower or aligner is trained fully, as PEFT
``modules_to_save`` (its trained copy is saved in the adapter and replaces the base's on merge). The optimizer
has one parameter group per part (and weight decay / none), at ``learning_rate``, ``vision_learning_rate``
and ``aligner_learning_rate``; the schedule scales each group alike.

Preference methods (DPO, ...) on a VLM are refused: trl's preference trainers are not wired for image rows here.
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from services.core.datasets import DatasetFormat, RowError, iter_rows, row_errors, to_messages
from services.core.errors import InvalidArgument
from services.core.image_datasets import (
    IMAGE_PART_TYPES,
    ImageError,
    ImagePolicy,
    data_dir_for,
    extract_archive,
    is_archive,
    load_image,
)
from services.core.vision import PROCESSOR_FILES, load_processor, part_of

from . import data as D
from .spec import Hyperparameters, TrainingSpec

if TYPE_CHECKING:
    from transformers import Trainer

    from .callbacks import TokenCounter
    from .events import EventSink
    from .train import DatasetFile, Plan

LogFn = Callable[..., None]
PARTS = ("language", "vision", "aligner")
_MAX_LISTED_ROWS = 50
_EXTRACTED_MARK = ".extracted"  # holds the data file's path inside the extraction folder


# --------------------------------------------------------------------------- rows


@dataclass
class VisionRow:
    """One row ready to encode: messages with image placeholders, and its image references in order."""

    row: int
    messages: list[dict[str, Any]]
    images: list[Any]
    policy: ImagePolicy


def dataset_data_file(path: Path) -> tuple[Path, Path | None]:
    """``(data file, image folder)`` of a downloaded dataset: an archive is extracted next to it (once)."""
    if not is_archive(path.name):
        return path, None
    dest = path.parent / f"{path.name}.d"
    mark = dest / _EXTRACTED_MARK
    if mark.is_file():
        data = dest / mark.read_text()
    else:
        shutil.rmtree(dest, ignore_errors=True)
        try:
            data = extract_archive(path, dest)
        except ImageError as err:
            raise InvalidArgument.for_field("datasets", f"{path.name}: {err}", reason="DATASET_ARCHIVE_INVALID") from None
        mark.write_text(str(data.relative_to(dest)))
    return data, data_dir_for(data)


def _file_type(name: str) -> str:
    name = name.lower().removesuffix(".gz")
    return next((s for s in ("jsonl", "json", "parquet") if name.endswith("." + s)), "jsonl")


def row_messages(row: dict[str, Any], fmt: DatasetFormat) -> tuple[list[dict[str, Any]], list[Any]]:
    """The conversation of ``row`` for the chat template (image parts as ``{"type": "image"}``) and its image
    references in order. ValueError ``(field, reason)`` for an invalid row."""
    if fmt is not DatasetFormat.MESSAGES:  # alpaca / sharegpt rows hold text only
        problems = row_errors(row, fmt)
        if problems:
            raise ValueError(*problems[0])
        return to_messages(row, fmt), []
    messages = row.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ValueError("messages", "must be a non-empty list of messages")
    # The shared validation, on a copy whose image parts read as text: roles, content types, an assistant turn.
    text_only = {**row, "messages": [_text_only(m) for m in messages]}
    problems = row_errors(text_only, fmt)
    if problems:
        raise ValueError(*problems[0])
    out: list[dict[str, Any]] = []
    refs: list[Any] = []
    for i, msg in enumerate(messages):
        content = msg.get("content")
        if isinstance(content, list):
            parts = []
            for j, part in enumerate(content):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind in IMAGE_PART_TYPES:
                    inner = part.get("image_url") if kind == "image_url" else part.get("image")
                    refs.append(inner.get("url") if isinstance(inner, dict) else inner)
                    parts.append({"type": "image"})
                elif kind == "text":
                    parts.append({"type": "text", "text": part["text"]})
                else:
                    raise ValueError(f"messages[{i}].content[{j}]", "must be a text or image part")
            content = parts
        out.append({"role": msg["role"], "content": content if content is not None else ""})
    return out, refs


def _text_only(msg: Any) -> Any:
    if not isinstance(msg, dict) or not isinstance(msg.get("content"), list):
        return msg
    parts = [{"type": "text", "text": "[image]"} if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES else p
             for p in msg["content"]]
    return {**msg, "content": parts}


def load_vision_rows(path: Path, dataset: str, fmt: str, max_images: int, log: LogFn) -> list[VisionRow]:
    """The rows of one dataset file (an archive is extracted); invalid rows (a bad image too) are skipped and
    reported by number. Rows with more than ``max_images`` images refuse the job, naming them."""
    data_file, image_dir = dataset_data_file(path)
    policy = ImagePolicy(base_dir=image_dir)
    fmt_ = DatasetFormat(fmt)
    rows: list[VisionRow] = []
    invalid: list[RowError] = []
    too_many: list[tuple[int, int]] = []
    for row_no, row in iter_rows(data_file, _file_type(data_file.name)):
        if isinstance(row, RowError):
            invalid.append(row)
            continue
        try:
            messages, refs = row_messages(row, fmt_)
        except ValueError as err:
            invalid.append(RowError(row_no, str(err.args[0]), str(err.args[1]) if len(err.args) > 1 else ""))
            continue
        if len(refs) > max_images:
            too_many.append((row_no, len(refs)))
            continue
        rows.append(VisionRow(row_no, messages, refs, policy))
    if too_many:
        shown = ", ".join(f"row {r} ({n} images)" for r, n in too_many[:10])
        raise InvalidArgument.for_field(
            "spec.hyperparameters.max_images_per_sample",
            f"{dataset}: {len(too_many)} row(s) hold more than {max_images} images: {shown}",
            reason="TOO_MANY_IMAGES")
    if invalid:
        log("dataset rows skipped", dataset=dataset, count=len(invalid), rows=[e.row for e in invalid[:_MAX_LISTED_ROWS]],
            reasons=[f"row {e.row} {e.field}: {e.reason}" for e in invalid[:10]])
    if not rows:
        raise InvalidArgument.for_field("datasets", f"{dataset} has no valid {fmt} rows", reason="DATASET_EMPTY")
    return rows


# --------------------------------------------------------------------------- encoding


# Per-token keys of an encoded row (padded in a batch); every other tensor is per image (concatenated).
_TOKEN_KEYS = ("input_ids", "attention_mask", "labels")


def _per_token(key: str) -> bool:
    return key in _TOKEN_KEYS or key.endswith("token_type_ids")


class VisionEncoder:
    """Encodes one conversation with the processor: ``input_ids``, ``attention_mask``, ``labels`` (assistant
    tokens only) and the processor's image tensors (``pixel_values``, ``image_grid_thw``, ...)."""

    def __init__(self, processor: Any, max_length: int) -> None:
        self.processor = processor
        self.tokenizer = getattr(processor, "tokenizer", processor)
        self.template = getattr(processor, "chat_template", None) or self.tokenizer.chat_template
        self.image_token = getattr(processor, "image_token", None) or ""
        self.image_token_id = (getattr(processor, "image_token_id", None)
                               or (self.tokenizer.convert_tokens_to_ids(self.image_token) if self.image_token else None))
        self.max_length = max_length

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False,
                            add_generation_prompt: bool = False) -> str:
        """The processor's chat template rendered to text (what :func:`data.render_with_spans` calls)."""
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def encode(self, messages: list[dict], images: list[Any]) -> tuple[dict[str, torch.Tensor] | None, str]:
        """``(example, status)``: status ``ok``, ``truncated``, ``images_cut`` (an image token lies beyond
        max_length: no example) or ``empty`` (no assistant token left: no example)."""
        text, spans = D.render_with_spans(self, messages)
        kwargs: dict[str, Any] = {"text": [text], "return_offsets_mapping": True, "return_tensors": "pt",
                                  "add_special_tokens": False}
        if images:
            kwargs["images"] = images
        enc = dict(self.processor(**kwargs))
        offsets = enc.pop("offset_mapping")[0].tolist()
        ids = enc["input_ids"][0]
        spans = self._expanded_spans(text, spans, ids)
        labels = torch.full_like(ids, D.IGNORE_INDEX)
        for k, (start, end) in enumerate(offsets):
            if end > start and any(s <= start < e for s, e in spans):
                labels[k] = ids[k]
        is_image = ids == self.image_token_id if self.image_token_id is not None else torch.zeros_like(ids, dtype=torch.bool)
        labels[is_image] = D.IGNORE_INDEX
        example = {k: (v[0] if _per_token(k) else v) for k, v in enc.items() if torch.is_tensor(v)}
        example["labels"] = labels
        status = "ok"
        if len(ids) > self.max_length:
            if is_image[self.max_length:].any():
                return None, "images_cut"
            example = {k: (v[: self.max_length] if _per_token(k) else v) for k, v in example.items()}
            status = "truncated"
        if bool((example["labels"][1:] == D.IGNORE_INDEX).all()):
            return None, "empty"
        return example, status

    def _expanded_spans(self, text: str, spans: list[tuple[int, int]], ids: torch.Tensor) -> list[tuple[int, int]]:
        """``spans`` (characters of the rendered text) moved to the text the processor tokenized, in which each
        image placeholder token was repeated once per image token (runs of the image token id in ``ids``)."""
        if not self.image_token or self.image_token_id is None:
            return spans
        where = [m.start() for m in re.finditer(re.escape(self.image_token), text)]
        is_image = (ids == self.image_token_id).tolist()
        runs = _runs(is_image)
        if not where or len(runs) != len(where):
            return spans
        width = len(self.image_token)

        def moved(x: int) -> int:
            return x + sum((n - 1) * width for p, n in zip(where, runs, strict=True) if p < x)

        return [(moved(s), moved(e)) for s, e in spans]


def _runs(flags: list[bool]) -> list[int]:
    """Lengths of the runs of True in ``flags``."""
    out: list[int] = []
    prev = False
    for f in flags:
        if f and prev:
            out[-1] += 1
        elif f:
            out.append(1)
        prev = f
    return out


@dataclass
class EncodeReport:
    truncated: list[int] = field(default_factory=list)
    images_cut: list[int] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)
    bad_images: list[str] = field(default_factory=list)


def check_rows(encoder: VisionEncoder, rows: list[VisionRow], dataset: str, log: LogFn) -> list[VisionRow]:
    """Encode every row once: the rows that train; truncated / skipped rows are reported by number."""
    kept: list[VisionRow] = []
    report = EncodeReport()
    for r in rows:
        try:
            images = [load_image(ref, r.policy) for ref in r.images]
        except ImageError as err:
            report.bad_images.append(f"row {r.row}: {err}")
            continue
        example, status = encoder.encode(r.messages, images)
        if status == "truncated":
            report.truncated.append(r.row)
        elif status != "ok":
            getattr(report, status).append(r.row)
        if example is not None:
            kept.append(r)
    if report.bad_images:
        log("rows with unreadable images skipped", dataset=dataset, count=len(report.bad_images),
            reasons=report.bad_images[:10])
    if report.truncated:
        log("rows truncated to max_length", dataset=dataset, max_length=encoder.max_length,
            count=len(report.truncated), rows=report.truncated[:_MAX_LISTED_ROWS])
    if report.images_cut:
        log("rows whose image tokens exceed max_length skipped", dataset=dataset, max_length=encoder.max_length,
            count=len(report.images_cut), rows=report.images_cut[:_MAX_LISTED_ROWS])
    if report.empty:
        log("rows without assistant tokens skipped", dataset=dataset, max_length=encoder.max_length,
            count=len(report.empty), rows=report.empty[:_MAX_LISTED_ROWS])
    if not kept:
        raise InvalidArgument.for_field("spec.hyperparameters.max_length", f"no row of {dataset} keeps an assistant "
                                        f"token within max_length={encoder.max_length}", reason="DATASET_EMPTY")
    return kept


class VisionDataset(torch.utils.data.Dataset):
    """Rows encoded on access (images read from disk each time, never all held in memory)."""

    def __init__(self, rows: list[VisionRow], encoder: VisionEncoder) -> None:
        self.rows = rows
        self.encoder = encoder

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        r = self.rows[i]
        example, status = self.encoder.encode(r.messages, [load_image(ref, r.policy) for ref in r.images])
        if example is None:  # check_rows kept only rows that encode
            raise InvalidArgument.for_field("datasets", f"row {r.row} no longer encodes ({status})")
        return example


class VisionCollator:
    """Right-padded batches (input ids with the pad id, labels -100, masks 0); image tensors concatenated."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, features: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        longest = max(len(f["input_ids"]) for f in features)
        batch: dict[str, torch.Tensor] = {}
        for key in features[0]:
            if _per_token(key):
                fill = self.pad_token_id if key == "input_ids" else D.IGNORE_INDEX if key == "labels" else 0
                out = torch.full((len(features), longest), fill, dtype=features[0][key].dtype)
                for i, f in enumerate(features):
                    out[i, : len(f[key])] = f[key]
                batch[key] = out
            else:
                present = [f[key] for f in features if key in f]
                batch[key] = torch.cat(present, dim=0)
        for key in {k for f in features[1:] for k in f} - set(batch):  # image tensors of rows after the first
            batch[key] = torch.cat([f[key] for f in features if key in f], dim=0)
        return batch


# --------------------------------------------------------------------------- model


def frozen_parts(hp: Hyperparameters) -> set[str]:
    return {p for p, frozen in (("vision", hp.freeze_vision_tower), ("aligner", hp.freeze_aligner)) if frozen}


def freeze(model: torch.nn.Module, hp: Hyperparameters) -> int:
    """Switch off the gradients of the frozen parts; the number of parameters frozen."""
    frozen = frozen_parts(hp)
    count = 0
    for name, p in model.named_parameters():
        if part_of(name) in frozen:
            p.requires_grad_(False)
            count += p.numel()
    return count


def part_modules(model: torch.nn.Module, part: str) -> list[str]:
    """The fewest module names that together hold exactly the parameters of ``part`` (module lists are split
    into their elements: PEFT's ``modules_to_save`` wraps modules that run)."""
    names: list[str] = []

    def visit(prefix: str, module: torch.nn.Module) -> None:
        parts = {part_of(f"{prefix}{n}") for n, _ in module.named_parameters()}
        if part not in parts:
            return
        if parts == {part} and prefix and not isinstance(module, torch.nn.ModuleList | torch.nn.ModuleDict):
            names.append(prefix.rstrip("."))
            return
        for child_name, child in module.named_children():
            visit(f"{prefix}{child_name}.", child)

    visit("", model)
    return names


def lora_targets(model: torch.nn.Module, targets: str | list[str]) -> list[str]:
    """The language model's linear layers that get adapters: every one (``all-linear``, the LM head excepted)
    or those named by ``targets`` (module names or suffixes; a string other than ``all-linear`` is a regex of
    the full name, as in PEFT) — never a vision tower or aligner layer."""
    out_emb = model.get_output_embeddings()
    names = []
    for name, module in model.named_modules():
        if not isinstance(module, torch.nn.Linear) or module is out_emb or part_of(f"{name}.weight") != "language":
            continue
        if targets == "all-linear":
            hit = True
        elif isinstance(targets, str):
            hit = re.fullmatch(targets, name) is not None
        else:
            hit = any(name == t or name.endswith("." + t) for t in targets)
        if hit:
            names.append(name)
    if not names:
        raise InvalidArgument.for_field("spec.hyperparameters.lora_target_modules",
                                        f"{targets!r} names no linear layer of the language model",
                                        reason="LORA_TARGETS_NOT_FOUND")
    return names


def peft_config(spec: TrainingSpec, model: torch.nn.Module) -> Any:
    from peft import LoraConfig

    hp = spec.hyperparameters
    trained_fully = [m for part in ("vision", "aligner") if part not in frozen_parts(hp) for m in part_modules(model, part)]
    return LoraConfig(r=hp.lora_rank, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                      target_modules=lora_targets(model, hp.lora_target_modules),
                      modules_to_save=trained_fully or None, use_dora=spec.method == "dora", task_type="CAUSAL_LM")


def param_groups(model: torch.nn.Module, learning_rates: dict[str, float], weight_decay: float,
                 decay_names: set[str]) -> list[dict[str, Any]]:
    """One optimizer group per (part, with weight decay or not) of the trainable parameters, language first;
    each group carries its ``lr`` and its ``part``."""
    groups: dict[tuple[str, bool], dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        part, decay = part_of(name), name in decay_names
        group = groups.setdefault((part, decay), {"params": [], "lr": learning_rates[part], "part": part,
                                                  "weight_decay": weight_decay if decay else 0.0})
        group["params"].append(p)
    return [groups[k] for k in sorted(groups, key=lambda k: (PARTS.index(k[0]), not k[1]))]


def part_learning_rates(hp: Hyperparameters) -> dict[str, float]:
    return {"language": hp.learning_rate, "vision": hp.vision_learning_rate, "aligner": hp.aligner_learning_rate}


def load_model(spec: TrainingSpec, base_dir: str) -> torch.nn.Module:
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(base_dir, dtype=torch.float32)
    if spec.trains_adapter:
        from peft import get_peft_model

        return get_peft_model(model, peft_config(spec, model))  # freezes every base weight
    freeze(model, spec.hyperparameters)
    return model


def vision_sft_trainer(plan: Plan, spec: TrainingSpec, sink: EventSink, args: dict[str, Any],
                       counter: TokenCounter) -> tuple[Trainer, bool, Any]:
    """The SFT trainer of a VLM; ``(trainer, has_eval, processor)``."""
    from transformers import Trainer, TrainingArguments

    from .train import _CountsTokens

    hp = spec.hyperparameters
    if spec.is_preference or spec.method == "qlora":
        raise InvalidArgument.for_field("spec.method", f"{spec.method} is not supported for a vision-language base "
                                        "model; use lora, dora or full", reason="METHOD_UNSUPPORTED_FOR_VLM")
    processor = load_processor(plan.base_dir)
    tokenizer = processor.tokenizer
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    encoder = VisionEncoder(processor, hp.max_length)

    def rows_of(d: DatasetFile) -> list[VisionRow]:
        rows = load_vision_rows(Path(d.path), d.name, d.format, hp.max_images_per_sample, sink.log)
        return check_rows(encoder, rows, d.name, sink.log)

    train_rows: list[VisionRow] = []
    val_rows: list[VisionRow] = []
    for d in plan.datasets:
        part, held = D.split_validation(rows_of(d), spec.validation_split, hp.seed)
        train_rows += part
        val_rows += held
    if plan.validation is not None:
        val_rows += rows_of(plan.validation)
    images = sum(len(r.images) for r in train_rows)
    sink.log("vision dataset ready", rows=len(train_rows), images=images, validation_rows=len(val_rows))
    if hp.packing:
        sink.log("packing is not used for a vision-language model (rows are padded)")
    model = load_model(spec, plan.base_dir)
    trainable = {p: 0 for p in PARTS}
    for name, p in model.named_parameters():
        if p.requires_grad:
            trainable[part_of(name)] += p.numel()
    sink.log("vision-language model loaded", frozen=sorted(frozen_parts(hp)), adapter=spec.trains_adapter,
             trainable_language=trainable["language"], trainable_vision=trainable["vision"],
             trainable_aligner=trainable["aligner"], learning_rates=part_learning_rates(hp))

    class VisionSftTrainer(_CountsTokens, Trainer):
        """The optimizer gets one parameter group per model part, at that part's learning rate."""

        def create_optimizer(self, model: Any = None) -> torch.optim.Optimizer:
            if self.optimizer is None:
                target = self.model if model is None else model
                cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, target)
                groups = param_groups(target, part_learning_rates(hp), self.args.weight_decay,
                                      set(self.get_decay_parameter_names(target)))
                self.optimizer = cls(groups, **kwargs)
            return self.optimizer

    trainer = VisionSftTrainer(model=model, args=TrainingArguments(**args),
                               train_dataset=VisionDataset(train_rows, encoder),
                               eval_dataset=VisionDataset(val_rows, encoder) if val_rows else None,
                               data_collator=VisionCollator(tokenizer.pad_token_id), processing_class=tokenizer)
    trainer.token_counter = counter
    return trainer, bool(val_rows), processor


def save_processor_files(base_dir: str | Path, out_dir: str | Path) -> None:
    """The base model's processor files (image processor config, chat template), so the trained model or adapter
    serves and registers as a VLM."""
    for name in PROCESSOR_FILES:
        src = Path(base_dir) / name
        if src.is_file():
            shutil.copy2(src, Path(out_dir) / name)
