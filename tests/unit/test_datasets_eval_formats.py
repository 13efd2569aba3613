"""Evaluation set formats of services/core/datasets.py: ``multiple_choice`` and ``qa`` rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from services.core.datasets import (
    EVALUATION_FORMATS,
    DatasetFormat,
    detect_row_format,
    row_errors,
    to_messages,
    to_multiple_choice,
    to_qa,
    validate_dataset,
)
from services.core.errors import InvalidArgument

MC = DatasetFormat.MULTIPLE_CHOICE
QA = DatasetFormat.QA
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"


def mc(**kw) -> dict:
    return {"question": "Capital of France?", "choices": ["Berlin", "Paris", "Rome"], "answer": 1, **kw}


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def where(report) -> list[tuple[int, str]]:
    return [(e.row, e.field) for e in report.errors]


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        (mc(), MC),
        ({"question": "q", "answer": "A"}, MC),  # no choices: still multiple choice, reported as such
        ({"choices": ["a", "b"]}, MC),
        ({"prompt": "p", "reference": "r"}, QA),
        ({"reference": "r"}, QA),
        # rows a training format claims keep that format
        ({"prompt": "p", "chosen": "a", "rejected": "b", "reference": "r"}, DatasetFormat.PREFERENCE),
        ({"prompt": "p", "completion": "a", "label": True, "reference": "r"}, DatasetFormat.KTO),
        ({"prompt": "p", "label": False, "choices": ["a", "b"]}, DatasetFormat.KTO),
        ({"messages": [], "reference": "r"}, DatasetFormat.MESSAGES),
        ({"conversations": [], "choices": ["a", "b"]}, DatasetFormat.SHAREGPT),
        ({"instruction": "i", "output": "o", "question": "q", "answer": 1}, DatasetFormat.ALPACA),
        # nothing new claims what no format claimed before
        ({"prompt": "p"}, None),
        ({"question": "q"}, None),
        ({"answer": 1}, None),
        ({"text": "free text"}, None),
        ({"prompt": "p", "reference": None}, None),  # null fields count as absent
    ],
)
def test_evaluation_rows_are_detected_without_stealing_training_rows(row, fmt) -> None:
    assert detect_row_format(row) == fmt


def test_evaluation_formats_are_the_two_new_ones() -> None:
    assert {MC, QA} == EVALUATION_FORMATS
    assert {f.value for f in DatasetFormat} >= {"multiple_choice", "qa"}


# --------------------------------------------------------------------------- multiple choice rows


@pytest.mark.parametrize(
    ("answer", "index"),
    [(0, 0), (2, 2), ("Rome", 2), ("A", 0), ("C", 2), ("Paris", 1)],
)
def test_the_answer_may_be_an_index_the_choice_text_or_a_letter(answer, index) -> None:
    row = mc(answer=answer)
    assert row_errors(row, MC) == []
    assert to_multiple_choice(row)["answer_index"] == index


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (mc(answer=3), [("answer", "index 3 out of range (3 choices: 0-2)")]),
        (mc(answer=-1), [("answer", "index -1 out of range (3 choices: 0-2)")]),
        (mc(answer="D"), [("answer", "letter 'D' out of range (3 choices: A-C)")]),
        (mc(answer="London"), [("answer", "'London' is neither the text of a choice nor a letter A-C")]),
        (mc(answer="b"), [("answer", "'b' is neither the text of a choice nor a letter A-C")]),
        (mc(answer=True), [("answer", "must be a choice index, the choice text or a letter, got bool")]),
        (mc(answer=1.0), [("answer", "must be a choice index, the choice text or a letter, got float")]),
        (mc(answer=None), [("answer", "missing required field")]),
        (
            {"question": "q", "choices": ["B", "A"], "answer": "A"},
            [("answer", "'A' is ambiguous: the text of choice 1 and the letter of choice 0")],
        ),
        (mc(question=""), [("question", "must not be empty")]),
        (mc(question="  "), [("question", "must not be empty")]),
        (mc(question=None), [("question", "missing required field")]),
        (mc(question=["q"]), [("question", "must be a string, got list")]),
        (mc(choices=["only"]), [("choices", "needs at least 2 choices, got 1")]),
        (mc(choices="Paris"), [("choices", "must be a list of strings, got string")]),
        (mc(choices=None, answer=0), [("choices", "missing required field")]),
        (mc(choices=["x", "y", "x"]), [("choices[2]", "duplicate of choices[0]")]),
        (mc(choices=["x", 2, ""]), [("choices[1]", "must be a string, got int"), ("choices[2]", "must not be empty")]),
        (mc(choices=[str(i) for i in range(27)]), [("choices", "at most 26 choices, got 27")]),
        (mc(id=""), [("id", "must not be empty")]),
        (mc(id=[1]), [("id", "must be a string or an integer, got list")]),
        (mc(id=True), [("id", "must be a string or an integer, got bool")]),
    ],
)
def test_bad_multiple_choice_rows_name_the_field(row, expected) -> None:
    assert row_errors(row, MC) == expected


def test_an_answer_letter_equal_to_its_own_choice_text_is_not_ambiguous() -> None:
    row = {"question": "Pick A", "choices": ["A", "B"], "answer": "A"}
    assert row_errors(row, MC) == [] and to_multiple_choice(row)["answer_index"] == 0


# --------------------------------------------------------------------------- qa rows


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        ({"prompt": "2+2?", "reference": "4"}, []),
        ({"prompt": "2+2?", "reference": "4", "id": 7}, []),
        ({"prompt": "", "reference": "4"}, [("prompt", "must not be empty")]),
        ({"reference": "4"}, [("prompt", "missing required field")]),
        ({"prompt": "2+2?", "reference": " "}, [("reference", "must not be empty")]),
        ({"prompt": "2+2?", "reference": 4}, [("reference", "must be a string, got int")]),
        ({"prompt": [{"role": "user", "content": "hi"}], "reference": "4"}, [("prompt", "must be a string, got list")]),
        ({"prompt": "2+2?", "reference": "4", "id": {"a": 1}}, [("id", "must be a string or an integer, got object")]),
    ],
)
def test_qa_rows_are_validated_field_by_field(row, expected) -> None:
    assert row_errors(row, QA) == expected


# --------------------------------------------------------------------------- conversions


def test_rows_convert_for_evaluation_and_for_chat() -> None:
    assert to_multiple_choice(mc(id=3, answer="B")) == {
        "id": "3",
        "question": "Capital of France?",
        "choices": ["Berlin", "Paris", "Rome"],
        "answer_index": 1,
    }
    assert to_qa({"prompt": "2+2?", "reference": "4"}) == {"id": None, "prompt": "2+2?", "reference": "4"}
    assert to_messages(mc(), MC) == [
        {"role": "user", "content": "Capital of France?\nA. Berlin\nB. Paris\nC. Rome"},
        {"role": "assistant", "content": "B"},
    ]
    assert to_messages({"prompt": "2+2?", "reference": "4"}, QA) == [
        {"role": "user", "content": "2+2?"},
        {"role": "assistant", "content": "4"},
    ]
    with pytest.raises(InvalidArgument) as err:
        to_multiple_choice(mc(answer=9))
    assert [v.field for v in err.value.violations] == ["answer"]
    with pytest.raises(InvalidArgument):
        to_qa({"prompt": "p"})


# --------------------------------------------------------------------------- whole files


def test_a_multiple_choice_file_reports_each_planted_bad_row(tmp_path: Path) -> None:
    rows = [mc(id=f"q{i}") for i in range(1, 9)]
    rows[2] = mc(id="q3", answer=5)  # row 3: answer out of range
    rows[4] = mc(id="q5", choices=["a", "a"], answer=0)  # row 5: duplicate choice
    rows[6] = mc(id="q2")  # row 7: id used by row 2
    rows.append({"prompt": "2+2?", "reference": "4"})  # row 9: a qa row among multiple choice ones
    report = validate_dataset(write_jsonl(tmp_path / "eval.jsonl", rows))
    assert report.format is MC and report.row_count == 9 and report.valid_rows == 5
    assert where(report) == [(3, "answer"), (5, "choices[1]"), (7, "id"), (9, "")]
    assert report.errors[2].reason == "duplicate id 'q2' (first used in row 2)"
    assert report.errors[3].reason == "row is in qa format, but most rows are multiple_choice"
    assert report.format_counts == {"multiple_choice": 8, "qa": 1}


def test_ids_are_unique_across_strings_and_integers(tmp_path: Path) -> None:
    rows = [
        {"prompt": "a", "reference": "1", "id": 1},
        {"prompt": "b", "reference": "2", "id": "1"},
        {"prompt": "c", "reference": "3"},
    ]
    report = validate_dataset(write_jsonl(tmp_path / "qa.jsonl", rows))
    assert report.format is QA and where(report) == [(2, "id")]


def test_expected_format_qa_reports_rows_of_other_formats(tmp_path: Path) -> None:
    rows = [{"prompt": "a", "reference": "1"}, mc(), {"instruction": "i", "output": "o"}]
    report = validate_dataset(write_jsonl(tmp_path / "qa.jsonl", rows), expected_format=QA)
    assert report.format is QA and report.valid_rows == 1
    assert [(e.row, e.reason) for e in report.errors] == [
        (2, "row is in multiple_choice format, expected qa"),
        (3, "row is in alpaca format, expected qa"),
    ]


def test_token_statistics_cover_evaluation_rows(tmp_path: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.train_from_iterator(
        ["capital of france berlin paris rome"], trainers.WordLevelTrainer(special_tokens=["[UNK]"])
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", chat_template=CHAT_TEMPLATE)
    path = write_jsonl(tmp_path / "mc.jsonl", [mc(), mc(question="Capital of France, again?")])
    report = validate_dataset(path, tokenizer=tokenizer, max_length=20)
    expected = [
        len(tokenizer.apply_chat_template(to_messages(r, MC), tokenize=True, return_dict=False))
        for r in (mc(), mc(question="Capital of France, again?"))
    ]
    stats = report.token_stats
    assert report.ok and stats is not None
    assert (stats.count, stats.min, stats.max) == (2, min(expected), max(expected))
    assert stats.over_length == sum(n > 20 for n in expected)
