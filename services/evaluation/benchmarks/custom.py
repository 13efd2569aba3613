"""A user's own evaluation set: multiple-choice rows or question/answer (generation) rows, validated row by row.

Multiple choice: ``{"question": str, "choices": [str, ...], "answer": index | choice text | letter}``, rendered as
MMLU is (``question\\nA. ..\\nB. ..\\nAnswer:``, choices the letters, acc). Generation:
``{"prompt": str, "reference": str}``, the prompt sent as is, scored by exact match after stripping whitespace,
case-insensitive. Either may carry an ``"id"`` (unique). Every bad row is reported with its row number, field and
reason; none is dropped silently.

Either kind may carry ``"images": [REF, ...]`` (a path inside the dataset archive or a ``data:`` URL): such a row
is sent as one chat turn, its images then its text, whatever ``apply_chat_template`` says (a completion prompt
cannot carry an image). A multiple-choice set with any image row is answered by generation, not log-likelihood
(the ``Score`` RPC and ``/v1/completions`` take text only): the question, the lettered choices and "Answer with
the letter of the correct choice.", the reply parsed to a choice (:func:`parse_choice`), acc as before. Every
row of such a set goes that way, so one metric never mixes two scoring methods. The images themselves are
checked and loaded by the evaluation job, which knows where the archive was extracted.
"""

from __future__ import annotations

import re
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
MAX_IMAGES_PER_ROW = 16
MC_INSTRUCTION = "Answer with the letter of the correct choice."
MC_GEN_MAX_TOKENS = 16  # a letter, maybe "B. blue": the reply is parsed, never read at length


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


def _check_images(n: int, row: dict, issues: list[RowIssue]) -> list[str] | None:
    """The row's image references (``[]`` without ``images``), or None when the list is malformed. Whether each
    one resolves to a readable image is the job's check (it has the extracted archive)."""
    images = row.get("images")
    if images is None:
        return []
    if not isinstance(images, list):
        issues.append(RowIssue(n, "images", f"must be a list of image references, got {type(images).__name__}"))
        return None
    if len(images) > MAX_IMAGES_PER_ROW:
        issues.append(RowIssue(n, "images", f"at most {MAX_IMAGES_PER_ROW} images per row, got {len(images)}"))
        return None
    refs: list[str] = []
    for i, ref in enumerate(images):
        if isinstance(ref, dict):  # {"url": REF}, as image_url parts write it
            ref = ref.get("url")
        if not _nonempty_str(ref):
            issues.append(RowIssue(n, f"images[{i}]", "must be a path inside the dataset archive or a data: URL"))
            return None
        refs.append(ref.strip())
    return refs


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
        images = _check_images(n, row, issues)
        if images is None:
            doc = None
        elif doc is not None:
            doc["images"] = images
            doc["row"] = n
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
    with_images = any(d["images"] for d in docs)
    suffix = " with images" if with_images else ""
    if kind == "multiple_choice":
        info = BenchmarkInfo(
            name=name,
            display_name=name,
            description="custom multiple-choice set" + (" with images (answered by generation)" if with_images else ""),
            kind="multiple_choice",
            metrics=["acc"],
            options={},
            num_samples=len(docs),
            default_num_fewshot=0,
            source="custom",
        )
        bench = CustomMultipleChoice(info, docs, with_images=with_images)
    else:
        info = BenchmarkInfo(
            name=name,
            display_name=name,
            description="custom question/answer set" + suffix,
            kind="generation",
            metrics=["exact_match"],
            options={},
            num_samples=len(docs),
            default_num_fewshot=0,
            source="custom",
        )
        bench = CustomGeneration(info, docs, with_images=with_images)
    return bench, issues


def parse_choice(text: str, choices: list[str]) -> int | None:
    """The choice a generated reply names, or None. In order: a leading letter (``B``, ``(B)``, ``B.``, ``B)``),
    "answer is B" / "Answer: B", the one choice whose text the reply holds as a word (case-insensitive), a
    leading bare letter followed by more words ("B blue"). Letters beyond the choices never count."""
    letters = LETTERS[: len(choices)]
    reply = text.strip()
    m = re.match(r"^\(?([A-Z])\)?(?=$|[.):,;])", reply)
    if m and m.group(1) in letters:
        return letters.index(m.group(1))
    m = re.search(r"(?i:answer)(?:\s+is)?\s*[:\-]?\s*\(?([A-Z])\)?(?![A-Za-z])", reply)
    if m and m.group(1) in letters:
        return letters.index(m.group(1))
    lowered = reply.lower()
    named = [i for i, c in enumerate(choices) if re.search(rf"(?<!\w){re.escape(c.strip().lower())}(?!\w)", lowered)]
    if len(named) == 1:
        return named[0]
    m = re.match(r"^([A-Z])\s", reply)
    if m and m.group(1) in letters:
        return letters.index(m.group(1))
    return None


def image_turn(text: str, images: list[str]) -> str | list[dict]:
    """A user turn's content: the images then the text as parts, or the bare text when there are none."""
    if not images:
        return text
    return [*({"type": "image", "image": ref} for ref in images), {"type": "text", "text": text}]


def image_messages(shots: list[tuple[dict, str, str]], doc: dict, text: str) -> list[dict]:
    """Chat turns of an image row: each shot (doc, its text, its answer) as a user turn then the answer as
    the assistant's, then the row itself."""
    messages: list[dict] = []
    for shot, shot_text, answer in shots:
        messages.append({"role": "user", "content": image_turn(shot_text, shot["images"])})
        messages.append({"role": "assistant", "content": answer})
    messages.append({"role": "user", "content": image_turn(text, doc["images"])})
    return messages


class _Custom(Benchmark):
    def __init__(self, info: BenchmarkInfo, docs: list[dict], *, with_images: bool = False):
        super().__init__(info, {}, field="benchmark")
        self._docs = docs
        self.with_images = with_images

    @staticmethod
    def image_refs(fewshot: list[dict], doc: dict) -> list[str]:
        return [ref for d in [*fewshot, doc] for ref in d.get("images", [])]

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

    def instructed_text(self, doc: dict) -> str:
        """The question and lettered choices with the instruction a generated answer needs."""
        lines = [doc["question"].strip()] + [f"{LETTERS[i]}. {c}" for i, c in enumerate(doc["choices"])]
        return "\n".join([*lines, MC_INSTRUCTION])

    def build(self, doc: dict, index: int, fewshot: list[dict], *, chat: bool) -> MCRequest | GenRequest:
        if self.with_images:
            text = self.instructed_text(doc)
            shots = [(s, self.instructed_text(s), self.target_text(s)) for s in fewshot]
            return GenRequest(
                doc_id=self.doc_id(doc, index),
                prompt=text,
                messages=image_messages(shots, doc, text),
                until=[],
                max_tokens=MC_GEN_MAX_TOKENS,
                reference=self.target_text(doc),
                images=self.image_refs(fewshot, doc),
            )
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

    def score(self, doc: dict, request: MCRequest | GenRequest, result: MCResult | GenResult) -> SampleScore:
        if isinstance(request, GenRequest):
            return self._score_generated(doc, request, result)  # type: ignore[arg-type]
        lls = list(result.loglikelihoods)  # type: ignore[union-attr]
        pred = M.argmax(lls)
        return SampleScore(
            doc_id=request.doc_id,
            metrics={"acc": 1.0 if pred == request.gold else 0.0},
            prediction=f"{LETTERS[pred]}. {doc['choices'][pred]}",
            reference=f"{LETTERS[doc['answer']]}. {doc['choices'][doc['answer']]}",
            prompt=request.context,
            extra={"loglikelihoods": lls, "pred": pred},
        )

    def _score_generated(self, doc: dict, request: GenRequest, result: GenResult) -> SampleScore:
        reply = result.texts[0] if result.texts else ""
        pred = parse_choice(reply, doc["choices"])
        gold = doc["answer"]
        return SampleScore(
            doc_id=request.doc_id,
            metrics={"acc": 1.0 if pred == gold else 0.0},
            prediction=f"{LETTERS[pred]}. {doc['choices'][pred]}" if pred is not None else reply,
            reference=f"{LETTERS[gold]}. {doc['choices'][gold]}",
            prompt=request.prompt,
            extra={"response": reply, "pred": -1 if pred is None else pred, "images": len(request.images)},
        )


class CustomGeneration(_Custom):
    def doc_to_text(self, doc: dict) -> str:
        return doc["prompt"]

    def target_text(self, doc: dict) -> str:
        return doc["reference"]

    def build(self, doc: dict, index: int, fewshot: list[dict], *, chat: bool) -> GenRequest:
        messages: list[dict] | None
        if self.with_images:
            shots = [(s, self.doc_to_text(s), self.target_text(s)) for s in fewshot]
            text, messages = self.doc_to_text(doc), image_messages(shots, doc, self.doc_to_text(doc))
        else:
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
            images=self.image_refs(fewshot, doc),
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
            extra={"images": len(request.images)} if request.images else {},
        )
