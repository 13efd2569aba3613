"""A user's own evaluation set: multiple-choice rows or question/answer (generation) rows, validated row by row.

Multiple choice: ``{"question": str, "choices": [str, ...], "answer": index | choice text | letter}``, rendered as
MMLU is (``question\\nA. ..\\nB. ..\\nAnswer:``, choices the letters, acc). Generation:
``{"prompt": str, "reference": str}``, the prompt sent as is, scored by exact match after stripping whitespace,
case-insensitive. Either may carry an ``"id"`` (unique). Every bad row is reported with its row number, field and
reason; none is dropped silently.
"""

from __future__ import annotations

import string
from collections.abc import Iterable

from services.core.errors import FieldViolation, InvalidArgument
from services.evaluation.benchmarks import metrics as M
from services.evaluation.benchmarks.tasks import DEFAULT_MAX_GEN_TOKS, Benchmark, render
from services.evaluation.benchmarks.types import (
    BenchmarkInfo,
    DataSource,
    Docs,
    GenRequest,
    GenResult,
    MCRequest,
    MCResult,
    RowIssue,
    SampleScore,
)

MAX_LISTED = 20
LETTERS = string.ascii_uppercase


def _kind_of(row: dict) -> str | None:
    if "choices" in row or "question" in row or "answer" in row:
        return "multiple_choice"
    if "prompt" in row or "reference" in row:
        return "generation"
    return None


def _nonempty_str(value) -> bool:
    return isinstance(value, str) and value.strip() != ""


def _check_mc(n: int, row: dict, issues: list[RowIssue]) -> dict | None:
    before = len(issues)
    if not _nonempty_str(row.get("question")):
        issues.append(RowIssue(n, "question", "must be a non-empty string"))
    choices = row.get("choices")
    if not isinstance(choices, list) or len(choices) < 2:
        issues.append(RowIssue(n, "choices", "must be a list of at least 2 strings"))
        choices = None
    elif len(choices) > len(LETTERS):
        issues.append(RowIssue(n, "choices", f"at most {len(LETTERS)} choices, got {len(choices)}"))
        choices = None
    else:
        for i, c in enumerate(choices):
            if not _nonempty_str(c):
                issues.append(RowIssue(n, f"choices[{i}]", "must be a non-empty string"))
                choices = None
                break
    answer = row.get("answer")
    gold = None
    if "answer" not in row or answer is None:
        issues.append(RowIssue(n, "answer", "missing: give the index, the text or the letter of the right choice"))
    elif choices is not None:
        if isinstance(answer, bool):
            issues.append(RowIssue(n, "answer", "must be an index, a choice text or a letter, not a boolean"))
        elif isinstance(answer, int):
            if 0 <= answer < len(choices):
                gold = answer
            else:
                issues.append(RowIssue(n, "answer", f"index {answer} out of range 0..{len(choices) - 1}"))
        elif isinstance(answer, str):
            if answer in choices:
                gold = choices.index(answer)
            elif len(answer.strip()) == 1 and answer.strip().upper() in LETTERS[: len(choices)]:
                gold = LETTERS.index(answer.strip().upper())
            else:
                issues.append(
                    RowIssue(
                        n,
                        "answer",
                        f"{answer!r} is neither one of the choices nor a letter A..{LETTERS[len(choices) - 1]}",
                    )
                )
        else:
            issues.append(
                RowIssue(n, "answer", f"must be an index, a choice text or a letter, got {type(answer).__name__}")
            )
    if len(issues) > before:
        return None
    return {"question": row["question"], "choices": list(choices or []), "answer": gold}


def _check_gen(n: int, row: dict, issues: list[RowIssue]) -> dict | None:
    before = len(issues)
    if not _nonempty_str(row.get("prompt")):
        issues.append(RowIssue(n, "prompt", "must be a non-empty string"))
    if not _nonempty_str(row.get("reference")):
        issues.append(RowIssue(n, "reference", "must be a non-empty string"))
    if len(issues) > before:
        return None
    return {"prompt": row["prompt"], "reference": row["reference"]}


def custom_benchmark(rows: Iterable[tuple[int, dict]], *, name: str, field: str) -> tuple[Benchmark, list[RowIssue]]:
    """Validate a user's set and make it a benchmark. ``rows`` are (1-based row number, row). The kind comes from the
    rows (all of one kind). Raises InvalidArgument on ``field`` listing the first 20 issues when any row is bad."""
    issues: list[RowIssue] = []
    docs: list[dict] = []
    kind: str | None = None
    first_row = 0
    seen_ids: dict[str, int] = {}
    count = 0
    for n, row in rows:
        count += 1
        if not isinstance(row, dict):
            issues.append(RowIssue(n, "row", f"must be a JSON object, got {type(row).__name__}"))
            continue
        row_kind = _kind_of(row)
        if row_kind is None:
            issues.append(
                RowIssue(
                    n,
                    "row",
                    "needs question, choices and answer (multiple choice) or prompt and reference (generation)",
                )
            )
            continue
        if kind is None:
            kind, first_row = row_kind, n
        elif row_kind != kind:
            issues.append(
                RowIssue(
                    n,
                    "row",
                    f"is a {row_kind.replace('_', ' ')} row in a "
                    f"{kind.replace('_', ' ')} set (row {first_row} set the kind)",
                )
            )
            continue
        doc = _check_mc(n, row, issues) if kind == "multiple_choice" else _check_gen(n, row, issues)
        if "id" in row:
            rid = row["id"]
            if isinstance(rid, bool) or not isinstance(rid, (str, int)) or str(rid).strip() == "":
                issues.append(RowIssue(n, "id", "must be a non-empty string or an integer"))
                doc = None
            elif str(rid) in seen_ids:
                issues.append(RowIssue(n, "id", f"{rid!r} repeats the id of row {seen_ids[str(rid)]}"))
                doc = None
            else:
                seen_ids[str(rid)] = n
        if doc is not None:
            doc["id"] = str(row["id"]) if "id" in row else str(n)
            docs.append(doc)
    if count == 0:
        raise InvalidArgument.for_field(field, f"{name}: the set has no rows", reason="EVAL_SET_EMPTY")
    if issues:
        listed = issues[:MAX_LISTED]
        more = f" (and {len(issues) - MAX_LISTED} more)" if len(issues) > MAX_LISTED else ""
        message = f"{field}: {name}: {len(issues)} bad row(s){more}: " + "; ".join(str(i) for i in listed)
        raise InvalidArgument(
            message,
            reason="EVAL_SET_INVALID",
            violations=[FieldViolation(f"{field}[row {i.row}].{i.field}", i.reason) for i in listed],
        )
    bench: Benchmark
    if kind == "multiple_choice":
        info = BenchmarkInfo(
            name=name,
            display_name=name,
            description="custom multiple-choice set",
            kind="multiple_choice",
            metrics=["acc"],
            options={},
            num_samples=len(docs),
            default_num_fewshot=0,
            source="custom",
        )
        bench = CustomMultipleChoice(info, docs)
    else:
        info = BenchmarkInfo(
            name=name,
            display_name=name,
            description="custom question/answer set",
            kind="generation",
            metrics=["exact_match"],
            options={},
            num_samples=len(docs),
            default_num_fewshot=0,
            source="custom",
        )
        bench = CustomGeneration(info, docs)
    return bench, issues


class _Custom(Benchmark):
    def __init__(self, info: BenchmarkInfo, docs: list[dict]):
        super().__init__(info, {}, field="benchmark")
        self._docs = docs

    def load(self, data: DataSource) -> Docs:
        return Docs(test=list(self._docs))

    def doc_id(self, doc: dict, index: int) -> str:
        return doc["id"]


class CustomMultipleChoice(_Custom):
    def doc_to_text(self, doc: dict) -> str:
        lines = [doc["question"].strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(doc["choices"])]
        return "\n".join(lines) + "\nAnswer:"

    def target_text(self, doc: dict) -> str:
        return LETTERS[doc["answer"]]

    def build(self, doc: dict, index: int, fewshot: list[dict], *, chat: bool) -> MCRequest:
        text, messages = render(
            "", [(self.doc_to_text(s), self.target_text(s)) for s in fewshot], self.doc_to_text(doc), chat=chat
        )
        letters = [LETTERS[i] for i in range(len(doc["choices"]))]
        delim = "" if chat else " "
        return MCRequest(
            doc_id=self.doc_id(doc, index),
            context=text,
            continuations=[delim + c for c in letters],
            gold=doc["answer"],
            choice_texts=letters,
            messages=messages,
        )

    def score(self, doc: dict, request: MCRequest, result: MCResult) -> SampleScore:
        lls = list(result.loglikelihoods)
        pred = M.argmax(lls)
        return SampleScore(
            doc_id=request.doc_id,
            metrics={"acc": 1.0 if pred == request.gold else 0.0},
            prediction=f"{LETTERS[pred]}. {doc['choices'][pred]}",
            reference=f"{LETTERS[doc['answer']]}. {doc['choices'][doc['answer']]}",
            prompt=request.context,
            extra={"loglikelihoods": lls, "pred": pred},
        )


class CustomGeneration(_Custom):
    def doc_to_text(self, doc: dict) -> str:
        return doc["prompt"]

    def target_text(self, doc: dict) -> str:
        return doc["reference"]

    def build(self, doc: dict, index: int, fewshot: list[dict], *, chat: bool) -> GenRequest:
        text, messages = render(
            "", [(self.doc_to_text(s), self.target_text(s)) for s in fewshot], self.doc_to_text(doc), chat=chat
        )
        return GenRequest(
            doc_id=self.doc_id(doc, index),
            prompt=text,
            messages=messages,
            until=[],
            max_tokens=DEFAULT_MAX_GEN_TOKS,
            reference=doc["reference"],
        )

    def score(self, doc: dict, request: GenRequest, result: GenResult) -> SampleScore:
        text = result.texts[0] if result.texts else ""
        value = M.exact_match(text.strip(), doc["reference"].strip(), ignore_case=True)
        return SampleScore(
            doc_id=request.doc_id,
            metrics={"exact_match": value},
            prediction=text,
            reference=doc["reference"],
            prompt=request.prompt,
        )
