"""Dataset rows -> training examples.

SFT rows are rendered with the model's chat template and tokenized once; the loss is on assistant
tokens only (labels -100 elsewhere). Assistant spans come from rendering each conversation prefix
with the template (``messages[:i]`` + generation prompt, then ``messages[:i+1]``), so they hold for any
template whose renderings of a conversation's prefixes are prefixes of the whole (ChatML, SmolLM2,
Llama 3...). Rows over ``max_length`` are truncated and reported by row number; invalid rows and rows
left without an assistant token are reported too. Nothing is dropped silently.

Batches are padding-free: a batch is flattened into one sequence whose position ids restart at every
row (``DataCollatorWithFlattening``); with ``packing`` rows are first grouped greedily into bins of at
most ``max_length`` tokens, so a step sees more rows.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from services.core.datasets import DatasetFormat, RowError, iter_rows, row_errors, to_kto, to_messages, to_preference
from services.core.errors import InvalidArgument

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

LogFn = Callable[..., None]
IGNORE_INDEX = -100
_MAX_LISTED_ROWS = 50
# Bump when the cached tokenization changes shape.
_CACHE_VERSION = 1


@dataclass
class Rows:
    """The valid rows of one dataset file as ``(row_number, row)`` and the rows that were skipped."""

    dataset: str
    format: DatasetFormat
    rows: list[tuple[int, dict]]
    invalid: list[RowError] = field(default_factory=list)


def load_rows(path: Path, dataset: str, fmt: str, file_type: str | None, log: LogFn) -> Rows:
    """Read and validate every row; invalid ones are skipped and reported with their row numbers."""
    fmt = DatasetFormat(fmt)
    out = Rows(dataset, fmt, [])
    for row_no, row in iter_rows(path, file_type):
        if isinstance(row, RowError):
            out.invalid.append(row)
            continue
        problems = row_errors(row, fmt)
        if problems:
            out.invalid.append(RowError(row_no, problems[0][0], problems[0][1]))
        else:
            out.rows.append((row_no, row))
    if out.invalid:
        log("dataset rows skipped", dataset=dataset, count=len(out.invalid),
            rows=[e.row for e in out.invalid[:_MAX_LISTED_ROWS]],
            reasons=[f"row {e.row} {e.field}: {e.reason}" for e in out.invalid[:10]])
    if not out.rows:
        raise InvalidArgument.for_field("datasets", f"{dataset} has no valid {fmt} rows", reason="DATASET_EMPTY")
    return out


def split_validation(rows: list[tuple[int, dict]], fraction: float, seed: int) -> tuple[list, list]:
    """A seeded random ``fraction`` of the rows (at least one) held out for evaluation."""
    if fraction <= 0 or len(rows) < 2:
        return rows, []
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    n_val = max(1, int(len(rows) * fraction))
    held = set(order[:n_val])
    return [r for i, r in enumerate(rows) if i not in held], [r for i, r in enumerate(rows) if i in held]


# --------------------------------------------------------------------------- SFT tokenization


def render_with_spans(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered with the chat template and the character spans of its assistant turns.

    Each span runs from the end of the generation prompt before an assistant message to the end of
    that message's rendering (its end-of-turn token included, trailing whitespace excluded).
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans: list[tuple[int, int]] = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (text.startswith(through) and through.startswith(before)):
            raise InvalidArgument.for_field(
                "base_model", "the chat template does not render conversation prefixes as prefixes of the whole "
                "conversation, so assistant tokens cannot be located", reason="CHAT_TEMPLATE_UNSUPPORTED")
        spans.append((len(before), len(through.rstrip())))
    return text, spans


def tokenize_conversation(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` of one conversation: labels are the ids on assistant tokens, -100 elsewhere."""
    text, spans = render_with_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids: list[int] = enc["input_ids"]
    labels = [IGNORE_INDEX] * len(ids)
    for k, (start, _end) in enumerate(enc["offset_mapping"]):
        if any(s <= start < e for s, e in spans):
            labels[k] = ids[k]
    return ids, labels


@dataclass
class SftData:
    examples: list[dict[str, list[int]]]
    truncated_rows: list[int]
    empty_rows: list[int]

    @property
    def tokens(self) -> int:
        return sum(len(e["input_ids"]) for e in self.examples)


def tokenize_sft(tokenizer: PreTrainedTokenizerBase, rows: Rows, max_length: int) -> SftData:
    """Tokenize every row; truncate at ``max_length`` and remember which rows were truncated or left empty."""
    data = SftData([], [], [])
    for row_no, row in rows.rows:
        ids, labels = tokenize_conversation(tokenizer, to_messages(row, rows.format))
        if len(ids) > max_length:
            ids, labels = ids[:max_length], labels[:max_length]
            data.truncated_rows.append(row_no)
        if all(label == IGNORE_INDEX for label in labels[1:]):
            data.empty_rows.append(row_no)
            continue
        data.examples.append({"input_ids": ids, "labels": labels})
    return data


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Changes whenever the vocabulary or the chat template changes."""
    h = hashlib.sha256()
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(str(tokenizer.chat_template).encode())
    return h.hexdigest()[:16]


def cached_sft(cache_dir: Path, sha256: str, tokenizer: PreTrainedTokenizerBase, rows_fn: Callable[[], Rows],
               max_length: int, log: LogFn, dataset: str) -> SftData:
    """The tokenized dataset, from ``cache_dir`` when this file, tokenizer and max_length were seen before."""
    key = f"sft-v{_CACHE_VERSION}-{sha256[:24]}-{tokenizer_fingerprint(tokenizer)}-{max_length}.json"
    path = cache_dir / key
    if path.exists():
        data = SftData(**json.loads(path.read_text()))
        log("tokenized dataset from cache", dataset=dataset, rows=len(data.examples), tokens=data.tokens)
    else:
        data = tokenize_sft(tokenizer, rows_fn(), max_length)
        cache_dir.mkdir(parents=True, exist_ok=True)
        # Every rank of a multi-process run may tokenize at once: each writes its own temp file and the
        # atomic rename makes the last identical copy win, so no reader ever sees a partial file.
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps({"examples": data.examples, "truncated_rows": data.truncated_rows,
                                   "empty_rows": data.empty_rows}))
        tmp.replace(path)
        log("dataset tokenized", dataset=dataset, rows=len(data.examples), tokens=data.tokens)
    report_sft(data, dataset, max_length, log)
    return data


def report_sft(data: SftData, dataset: str, max_length: int, log: LogFn) -> None:
    if data.truncated_rows:
        log("rows truncated to max_length", dataset=dataset, max_length=max_length, count=len(data.truncated_rows),
            rows=data.truncated_rows[:_MAX_LISTED_ROWS])
    if data.empty_rows:
        log("rows without assistant tokens skipped", dataset=dataset, max_length=max_length,
            count=len(data.empty_rows), rows=data.empty_rows[:_MAX_LISTED_ROWS])
    if not data.examples:
        raise InvalidArgument.for_field("hyperparameters.max_length", f"no row of {dataset} keeps an assistant token "
                                        f"within max_length={max_length}", reason="DATASET_EMPTY")


def pack(examples: list[dict[str, list[int]]], max_length: int) -> list[dict[str, list[list[int]]]]:
    """Greedy first-fit packing of rows (in order) into bins of at most ``max_length`` tokens."""
    bins: list[dict[str, list[list[int]]]] = []
    room: list[int] = []
    for ex in examples:
        n = len(ex["input_ids"])
        for i, free in enumerate(room):
            if n <= free:
                bins[i]["input_ids"].append(ex["input_ids"])
                bins[i]["labels"].append(ex["labels"])
                room[i] -= n
                break
        else:
            bins.append({"input_ids": [ex["input_ids"]], "labels": [ex["labels"]]})
            room.append(max_length - n)
    return bins


class FlatteningCollator:
    """Padding-free batches: rows (or packed bins of rows) flattened into one sequence, position ids
    restarting per row, -100 at every row boundary (transformers' ``DataCollatorWithFlattening``)."""

    def __init__(self) -> None:
        from transformers import DataCollatorWithFlattening

        self._flatten = DataCollatorWithFlattening(return_tensors="pt")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, Any]:
        rows: list[dict[str, list[int]]] = []
        for f in features:
            if f["input_ids"] and isinstance(f["input_ids"][0], list):  # a packed bin
                rows += [{"input_ids": i, "labels": lab} for i, lab in zip(f["input_ids"], f["labels"], strict=True)]
            else:
                rows.append({"input_ids": f["input_ids"], "labels": f["labels"]})
        return self._flatten(rows)


# --------------------------------------------------------------------------- preference rows


def preference_records(rows: Rows, method: str) -> list[dict[str, Any]]:
    """Conversational records for trl: ``{prompt, chosen, rejected}`` (kto: ``{prompt, completion, label}``)."""
    if method == "kto":
        if rows.format is DatasetFormat.KTO:
            out = []
            for _, row in rows.rows:
                kto = to_kto(row)
                out.append({"prompt": kto["prompt_messages"], "completion": kto["completion"], "label": kto["label"]})
            return out
        if rows.format is DatasetFormat.PREFERENCE:  # a pair gives one desirable and one undesirable example
            out = []
            for _, row in rows.rows:
                pref = to_preference(row, rows.format)
                out.append({"prompt": pref["prompt_messages"], "completion": pref["chosen"], "label": True})
                out.append({"prompt": pref["prompt_messages"], "completion": pref["rejected"], "label": False})
            return out
    elif rows.format is DatasetFormat.PREFERENCE:
        return [dict(zip(("prompt", "chosen", "rejected"), _pref_triple(to_preference(row, rows.format)), strict=True))
                for _, row in rows.rows]
    want = "kto or preference" if method == "kto" else "preference"
    raise InvalidArgument.for_field("datasets.format", f"{method} trains on {want} rows, {rows.dataset} holds "
                                    f"{rows.format} rows", reason="DATASET_FORMAT_MISMATCH")


def _pref_triple(pref: dict[str, list[dict]]) -> tuple[list[dict], list[dict], list[dict]]:
    return pref["prompt_messages"], pref["chosen"], pref["rejected"]


def report_long_preference_rows(tokenizer: PreTrainedTokenizerBase, rows: Rows, records: Iterable[dict[str, Any]],
                                max_length: int, log: LogFn) -> None:
    """Report (by row number) the preference rows the trainer will truncate at ``max_length``."""
    long_rows = []
    per_row = 2 if rows.format is DatasetFormat.PREFERENCE and any("completion" in r for r in records) else 1
    for i, rec in enumerate(records):
        answers = [rec[k] for k in ("chosen", "rejected", "completion") if k in rec]
        longest = max(len(tokenizer.apply_chat_template(rec["prompt"] + a, tokenize=True, return_dict=False))
                      for a in answers)
        if longest > max_length:
            long_rows.append(rows.rows[i // per_row][0])
    if long_rows:
        long_rows = sorted(set(long_rows))
        log("rows truncated to max_length", dataset=rows.dataset, max_length=max_length, count=len(long_rows),
            rows=long_rows[:_MAX_LISTED_ROWS])
