"""Dataset detection, parsing and validation (services/core/datasets.py)."""

from __future__ import annotations

import gzip
import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from services.core import datasets
from services.core.datasets import (
    DatasetFormat,
    RowError,
    detect_file_type,
    detect_row_format,
    iter_rows,
    row_errors,
    to_kto,
    to_messages,
    to_preference,
    validate_dataset,
)
from services.core.errors import InvalidArgument, NotFound

DATA = Path(__file__).parent.parent / "data" / "datasets"
CHAT_TEMPLATE = "{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }}\n{% endfor %}"


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def where(report) -> list[tuple[int, str]]:
    return [(e.row, e.field) for e in report.errors]


# --------------------------------------------------------------------------- detection


@pytest.mark.parametrize("fmt", list(DatasetFormat))
@pytest.mark.parametrize("ext", ["jsonl", "json", "parquet"])
def test_each_format_is_detected_in_each_file_type(fmt: DatasetFormat, ext: str) -> None:
    path = DATA / f"{fmt}.{ext}"
    report = validate_dataset(path)
    assert report.ok, report.errors
    assert (report.file_type, report.format) == (ext, fmt)
    assert (report.row_count, report.valid_rows, report.format_counts) == (3, 3, {str(fmt): 3})
    assert report.sha256 == sha256_of(path)
    assert report.size_bytes == path.stat().st_size
    assert report.token_stats is None


def test_json_object_with_data_array_and_gzipped_jsonl_are_read() -> None:
    wrapped = validate_dataset(DATA / "messages_data.json")
    gzipped = validate_dataset(DATA / "messages.jsonl.gz")
    for report, path in ((wrapped, DATA / "messages_data.json"), (gzipped, DATA / "messages.jsonl.gz")):
        assert report.ok and report.format is DatasetFormat.MESSAGES and report.row_count == 3
        assert report.sha256 == sha256_of(path)  # of the stored (compressed) bytes
    assert list(iter_rows(DATA / "messages.jsonl.gz")) == list(iter_rows(DATA / "messages.jsonl"))


def test_file_type_is_sniffed_when_the_extension_does_not_say(tmp_path: Path) -> None:
    jsonl_named_json = tmp_path / "train.json"
    jsonl_named_json.write_bytes((DATA / "alpaca.jsonl").read_bytes())
    pretty_wrapper = tmp_path / "data.json"
    pretty_wrapper.write_bytes((DATA / "messages_data.json").read_bytes())
    parquet_no_ext = tmp_path / "upload-1"
    parquet_no_ext.write_bytes((DATA / "kto.parquet").read_bytes())
    array_no_ext = tmp_path / "upload-2"
    array_no_ext.write_bytes((DATA / "sharegpt.json").read_bytes())
    gz_no_ext = tmp_path / "upload-3"
    gz_no_ext.write_bytes((DATA / "messages.jsonl.gz").read_bytes())

    assert detect_file_type(jsonl_named_json) == "jsonl"
    assert detect_file_type(pretty_wrapper) == "json"
    assert detect_file_type(parquet_no_ext) == "parquet"
    assert detect_file_type(array_no_ext) == "json"
    assert detect_file_type(gz_no_ext) == "jsonl"
    assert validate_dataset(parquet_no_ext).format is DatasetFormat.KTO
    assert validate_dataset(jsonl_named_json).ok


def test_explicit_file_type_overrides_detection_and_unknown_ones_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "rows.txt"
    path.write_bytes((DATA / "alpaca.json").read_bytes())
    assert validate_dataset(path, file_type="json").ok
    assert validate_dataset(path, file_type="jsonl").row_count > 3  # read as lines: every line reported
    with pytest.raises(InvalidArgument) as err:
        validate_dataset(path, file_type="csv")
    assert err.value.violations[0].field == "file_type"
    with pytest.raises(NotFound):
        validate_dataset(tmp_path / "missing.jsonl")
    with pytest.raises(NotFound):
        iter_rows(tmp_path / "missing.jsonl")


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"messages": []}, DatasetFormat.MESSAGES),
        ({"instruction": "x", "output": "y"}, DatasetFormat.ALPACA),
        ({"output": "y"}, DatasetFormat.ALPACA),
        ({"conversations": []}, DatasetFormat.SHAREGPT),
        ({"prompt": "p", "chosen": "a", "rejected": "b"}, DatasetFormat.PREFERENCE),
        ({"messages": [], "chosen": "a", "rejected": "b"}, DatasetFormat.PREFERENCE),
        ({"prompt": "p", "completion": "a", "label": True}, DatasetFormat.KTO),
        ({"prompt": "p", "completion": "a"}, DatasetFormat.KTO),
        ({"text": "free text"}, None),
        ({"prompt": "p"}, None),
        ([1, 2], None),
    ],
)
def test_row_format_is_detected_from_keys(row, fmt) -> None:
    assert detect_row_format(row) == fmt


# --------------------------------------------------------------------------- bad rows


def test_planted_bad_rows_are_reported_exactly() -> None:
    report = validate_dataset(DATA / "messages_bad_rows.jsonl")
    assert report.format is DatasetFormat.MESSAGES and not report.ok
    assert where(report) == [
        (3, ""),
        (5, "messages[1].content"),
        (6, "messages[0].role"),
        (7, "messages[0].role"),
        (8, "messages[1].content"),
        (9, ""),
        (13, ""),
        (14, ""),
    ]
    reasons = [e.reason for e in report.errors]
    assert reasons[0].startswith("invalid JSON: Expecting ',' delimiter")
    assert reasons[1] == "must be a string or a list of text parts, got int"
    assert reasons[2] == "missing required field"
    assert reasons[3].startswith("unknown role 'bot'")
    assert reasons[4] == "assistant content is empty"
    assert reasons[5].startswith("row is in alpaca format")
    assert reasons[6] == "row must be a JSON object, got list"
    assert reasons[7].startswith("unrecognised row") and "non-null keys: text" in reasons[7]
    # 15 lines, one blank: 14 rows, every one either valid or reported
    assert (report.row_count, report.valid_rows, report.invalid_rows) == (14, 6, 8)
    assert report.format_counts == {"messages": 10, "alpaca": 1}
    assert report.sha256 == sha256_of(DATA / "messages_bad_rows.jsonl")


def test_malformed_jsonl_line_is_yielded_as_an_error_not_raised() -> None:
    rows = list(iter_rows(DATA / "messages_bad_rows.jsonl"))
    assert [n for n, _ in rows] == [1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 13, 14, 15]
    bad = rows[2][1]
    assert isinstance(bad, RowError) and bad.row == 3 and bad.reason.startswith("invalid JSON")
    assert sum(isinstance(v, RowError) for _, v in rows) == 1


@pytest.mark.parametrize(
    ("row", "fmt", "expected"),
    [
        ({"instruction": "Say hi.", "input": ""}, DatasetFormat.ALPACA, [("output", "missing required field")]),
        ({"instruction": "Say hi.", "output": 3}, DatasetFormat.ALPACA, [("output", "must be a string, got int")]),
        ({"instruction": "", "output": "hi"}, DatasetFormat.ALPACA, [("instruction", "must not be empty")]),
        (
            {"instruction": "q", "output": "a", "history": [["only one"]]},
            DatasetFormat.ALPACA,
            [("history[0]", "must be an [instruction, output] pair of strings")],
        ),
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "bot", "value": "yo"}]},
            DatasetFormat.SHAREGPT,
            [("conversations[1].from", "unknown role 'bot' (expected one of system, human, user, gpt, assistant, function_call, observation, tool)")],
        ),
        (
            {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": ""}]},
            DatasetFormat.SHAREGPT,
            [("conversations[1].value", "assistant content is empty")],
        ),
        (
            {"conversations": [{"from": "human", "value": "hi"}]},
            DatasetFormat.SHAREGPT,
            [("conversations", "needs at least one gpt turn with content")],
        ),
        ({"messages": [{"role": "user", "content": "hi"}]}, DatasetFormat.MESSAGES, [("messages", "needs at least one assistant message with content")]),
        ({"messages": "hi"}, DatasetFormat.MESSAGES, [("messages", "must be a list of messages, got string")]),
        (
            {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}, {"role": "assistant", "content": "ok"}]},
            DatasetFormat.MESSAGES,
            [("messages[0].content[0].image_url.url", "missing required field")],
        ),
        ({"prompt": "p", "chosen": "same", "rejected": "same"}, DatasetFormat.PREFERENCE, [("rejected", "must differ from chosen")]),
        ({"prompt": "p", "chosen": "a"}, DatasetFormat.PREFERENCE, [("rejected", "missing required field")]),
        ({"chosen": "a", "rejected": "b"}, DatasetFormat.PREFERENCE, [("prompt", "missing required field")]),
        (
            {"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "user", "content": "a"}, "rejected": "b"},
            DatasetFormat.PREFERENCE,
            [("chosen.role", "must be 'assistant', got 'user'")],
        ),
        ({"prompt": "p", "completion": "a", "label": 1}, DatasetFormat.KTO, [("label", "must be a boolean, got int")]),
        ({"prompt": "p", "completion": "a"}, DatasetFormat.KTO, [("label", "missing required field")]),
    ],
)
def test_invalid_rows_name_the_field_and_reason(row, fmt, expected) -> None:
    assert row_errors(row, fmt) == expected


@pytest.mark.parametrize(
    ("row", "fmt"),
    [
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}, {"role": "assistant", "content": "yo"}]}, DatasetFormat.MESSAGES),
        (
            {
                "messages": [
                    {"role": "user", "content": "weather?"},
                    {"role": "assistant", "content": None, "tool_calls": [{"id": "1", "type": "function", "function": {"name": "w", "arguments": "{}"}}]},
                    {"role": "tool", "content": "sunny", "tool_call_id": "1"},
                    {"role": "assistant", "content": "Sunny."},
                ]
            },
            DatasetFormat.MESSAGES,
        ),
        (
            {"messages": [{"role": "user", "content": "q"}], "chosen": {"role": "assistant", "content": "a"}, "rejected": [{"role": "assistant", "content": "b"}]},
            DatasetFormat.PREFERENCE,
        ),
        ({"prompt": [{"role": "user", "content": "q"}], "chosen": "a", "rejected": "b"}, DatasetFormat.PREFERENCE),
        ({"prompt": "p", "completion": [{"role": "assistant", "content": "a"}], "label": False}, DatasetFormat.KTO),
    ],
)
def test_valid_row_variants_have_no_errors(row, fmt) -> None:
    assert row_errors(row, fmt) == []


def test_minority_format_rows_are_reported_against_the_dominant_one(tmp_path: Path) -> None:
    path = write_jsonl(
        tmp_path / "mixed.jsonl",
        [
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
            {"instruction": "q1", "output": "a1"},
            {"instruction": "q2"},  # invalid alpaca: still counts for alpaca, reported with its field
            {"instruction": "q3", "output": "a3"},
        ],
    )
    report = validate_dataset(path)
    assert report.format is DatasetFormat.ALPACA
    assert [(e.row, e.field, e.reason) for e in report.errors] == [
        (1, "", "row is in messages format, but most rows are alpaca"),
        (3, "output", "missing required field"),
    ]
    assert report.format_counts == {"alpaca": 3, "messages": 1}


def test_expected_format_mismatch_reports_every_other_row(tmp_path: Path) -> None:
    report = validate_dataset(DATA / "alpaca.jsonl", expected_format=DatasetFormat.MESSAGES)
    assert report.format is DatasetFormat.MESSAGES and not report.ok
    assert [(e.row, e.field, e.reason) for e in report.errors] == [
        (n, "", "row is in alpaca format, expected messages") for n in (1, 2, 3)
    ]
    assert report.valid_rows == 0
    # the expected format wins even where it is the minority
    mixed = write_jsonl(tmp_path / "m.jsonl", [{"instruction": "q", "output": "a"}] * 2 + [{"prompt": "p", "completion": "c", "label": True}])
    report = validate_dataset(mixed, expected_format="kto")
    assert report.format is DatasetFormat.KTO and where(report) == [(1, ""), (2, "")] and report.valid_rows == 1
    with pytest.raises(InvalidArgument) as err:
        validate_dataset(mixed, expected_format="csv-rows")
    assert err.value.violations[0].field == "expected_format"


@pytest.mark.parametrize(("name", "content"), [("e.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("e.json", "[]"), ("d.json", '{"data": []}')])
def test_empty_dataset_is_reported(tmp_path: Path, name: str, content: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    report = validate_dataset(path)
    assert report.errors == [RowError(0, "", "dataset has no rows")]
    assert (report.row_count, report.format, report.ok) == (0, None, False)


def test_errors_are_capped_but_counts_stay_exact(tmp_path: Path) -> None:
    good = {"instruction": "q", "output": "a"}
    path = write_jsonl(tmp_path / "many.jsonl", [good] + [{"instruction": "q"}] * 50)
    report = validate_dataset(path, max_errors=10)
    assert [e.row for e in report.errors] == list(range(2, 12))
    assert (report.row_count, report.valid_rows, report.invalid_rows) == (51, 1, 50)
    with pytest.raises(InvalidArgument):
        validate_dataset(path, max_errors=0)


# --------------------------------------------------------------------------- JSON and Parquet


def test_json_syntax_error_names_the_row_and_keeps_the_rows_before(tmp_path: Path) -> None:
    path = tmp_path / "broken.json"
    tail = ",\n".join([json.dumps({"instruction": "x" * 1000, "output": "y"})] * 3000)  # > 1 read chunk
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": "c", "output": "d"},\n {"instruction": "e" "output": "f"},\n' + tail + "]")
    report = validate_dataset(path)
    assert report.format is DatasetFormat.ALPACA and report.valid_rows == 2 and report.row_count == 3
    assert where(report) == [(3, "")]
    assert report.errors[0].reason.startswith("invalid JSON: Expecting ',' delimiter at char")
    assert report.sha256 == sha256_of(path)  # the rest of the file is still hashed


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('{"version": 2, "rows": []}', (0, "data", "missing required field")),
        ('{"data": {"a": 1}}', (0, "data", "must be an array of rows")),
        ('[{"instruction": "a", "output": "b"}] [1]', (0, "", "invalid JSON: extra data after the rows")),
        ('[{"instruction": "a", "output": "b"}', (2, "", "invalid JSON: expected ',' or ']' after row 1, the file ends")),
        ('[{"instruction": "a", "output": "b"} {"instruction": "a"}]', (2, "", "invalid JSON: expected ',' or ']' after row 1")),
        ('"just a string"', (0, "", "a JSON dataset must be an array")),
    ],
)
def test_malformed_json_structure_is_reported(tmp_path: Path, content: str, expected: tuple[int, str, str]) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    errors = [e for e in validate_dataset(path, file_type="json").errors if e.reason != "dataset has no rows"]
    assert [(e.row, e.field) for e in errors] == [expected[:2]]
    assert errors[0].reason.startswith(expected[2])


def test_large_json_array_is_streamed_across_buffer_refills(tmp_path: Path) -> None:
    rows = [{"instruction": f"question {i} " + "x" * 900, "output": str(i)} for i in range(3000)]
    rows[1500]["output"] = "y" * (3 << 20)  # one value longer than several read chunks
    path = tmp_path / "big.json"
    path.write_text(json.dumps({"meta": {"n": 3000}, "data": rows}))
    read = list(iter_rows(path))
    assert [n for n, _ in read] == list(range(1, 3001))
    assert read[1500][1] == rows[1500] and read[-1][1] == rows[-1]
    report = validate_dataset(path)
    assert report.ok and report.row_count == 3000 and report.sha256 == sha256_of(path)


@pytest.mark.parametrize("chunk", [1, 3, 7, 64])
def test_json_values_split_at_any_read_boundary_are_read_whole(tmp_path: Path, monkeypatch, chunk: int) -> None:
    monkeypatch.setattr(datasets, "_CHUNK", chunk)
    rows = [
        {"instruction": "caf\u00e9 \u2603 \U0001f600 \"quoted\" back\\slash", "output": "ok", "n": 12345.5e-3},
        {"instruction": "t", "output": "o", "flags": [True, False, None, -7, 1e10], "nested": {"a": [[], {}]}},
        {"instruction": "\u00e9" * 5, "output": "\n\t"},
    ]
    path = tmp_path / "rows.json"
    path.write_text("\ufeff [ " + " ,\n".join(json.dumps(r, ensure_ascii=i % 2 == 0) for i, r in enumerate(rows)) + " ]\n", encoding="utf-8")
    assert list(iter_rows(path)) == list(enumerate(rows, start=1))
    broken = tmp_path / "broken.json"
    broken.write_text('[{"instruction": "a", "output": "b"}, {"instruction": "a" "output": "b"}]')
    assert [(n, type(v).__name__) for n, v in iter_rows(broken)] == [(1, "dict"), (2, "RowError")]


def test_parquet_mixed_columns_treat_nulls_as_absent(tmp_path: Path) -> None:
    rows = [
        {"instruction": "q1", "output": "a1"},
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
        {"instruction": "q2", "input": "ctx", "output": "a2"},
    ]
    path = tmp_path / "mixed.parquet"
    pq.write_table(pa.Table.from_struct_array(pa.array(rows)), path, row_group_size=1)
    assert [row for _, row in iter_rows(path)] == rows
    report = validate_dataset(path)
    assert report.file_type == "parquet" and report.format is DatasetFormat.ALPACA
    assert where(report) == [(2, "")] and report.sha256 == sha256_of(path)


def test_corrupt_parquet_is_reported_not_raised(tmp_path: Path) -> None:
    path = tmp_path / "bad.parquet"
    path.write_bytes(b"PAR1" + b"\x00" * 64)
    report = validate_dataset(path)
    assert where(report) == [(0, "")] and report.errors[0].reason.startswith("invalid Parquet data")
    assert report.row_count == 0 and not report.ok


def test_invalid_utf8_and_truncated_gzip_are_row_errors(tmp_path: Path) -> None:
    path = tmp_path / "bytes.jsonl"
    good = json.dumps({"instruction": "q", "output": "a"}).encode()
    path.write_bytes(good + b"\n" + b'{"instruction": "\xff", "output": "a"}\n' + good + b"\n")
    report = validate_dataset(path)
    assert where(report) == [(2, "")] and report.errors[0].reason.startswith("invalid UTF-8")

    truncated = tmp_path / "t.jsonl.gz"
    truncated.write_bytes(gzip.compress((good + b"\n") * 200)[:-30])
    report = validate_dataset(truncated)
    assert report.errors and report.errors[-1].reason.startswith("unreadable file data")
    assert report.row_count == report.valid_rows + 1


# --------------------------------------------------------------------------- conversion


def test_alpaca_row_becomes_messages() -> None:
    row = {"instruction": "Translate.", "input": "Good night", "output": "Bonne nuit", "system": "Be exact.", "history": [["Hi", "Hello"]]}
    assert to_messages(row, DatasetFormat.ALPACA) == [
        {"role": "system", "content": "Be exact."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Translate.\nGood night"},
        {"role": "assistant", "content": "Bonne nuit"},
    ]
    assert to_messages({"instruction": "Say hi.", "output": "hi"}, "alpaca") == [
        {"role": "user", "content": "Say hi."},
        {"role": "assistant", "content": "hi"},
    ]


def test_sharegpt_and_messages_rows_become_messages() -> None:
    row = {"system": "Be brief.", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello"}, {"from": "observation", "value": "{}"}]}
    assert to_messages(row, DatasetFormat.SHAREGPT) == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "tool", "content": "{}"},
    ]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}, {"role": "assistant", "content": "c", "name": "bot"}]}
    assert to_messages(parts, DatasetFormat.MESSAGES) == [{"role": "user", "content": "a\nb"}, {"role": "assistant", "content": "c", "name": "bot"}]


def test_conversion_rejects_invalid_rows_with_field_violations() -> None:
    with pytest.raises(InvalidArgument) as err:
        to_messages({"instruction": "q"}, DatasetFormat.ALPACA)
    assert [(v.field, v.description) for v in err.value.violations] == [("output", "missing required field")]
    with pytest.raises(InvalidArgument):
        to_messages({"prompt": "p", "chosen": "a", "rejected": "b"}, DatasetFormat.PREFERENCE)


def test_preference_and_kto_rows_are_normalised() -> None:
    assert to_preference({"prompt": "Q?", "chosen": "yes", "rejected": "no"}, DatasetFormat.PREFERENCE) == {
        "prompt_messages": [{"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    conv = {
        "messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}],
        "chosen": {"role": "assistant", "content": "yes"},
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    assert to_preference(conv, DatasetFormat.PREFERENCE) == {
        "prompt_messages": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q?"}],
        "chosen": [{"role": "assistant", "content": "yes"}],
        "rejected": [{"role": "assistant", "content": "no"}],
    }
    assert to_kto({"prompt": "Q?", "completion": "yes", "label": True}) == {
        "prompt_messages": [{"role": "user", "content": "Q?"}],
        "completion": [{"role": "assistant", "content": "yes"}],
        "label": True,
    }


# --------------------------------------------------------------------------- token statistics


@pytest.fixture(scope="module")
def word_tokenizer():
    """A real WordLevel tokenizer trained offline on a few sentences: (raw tokenizer, factory)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    raw = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    corpus = ["You are terse .", "What is 2 + 2 ?", "Name a colour .", "Blue . Green .", "user assistant system"]
    raw.train_from_iterator(corpus, trainers.WordLevelTrainer(special_tokens=["[UNK]"]))

    def make(chat_template: str | None):
        return PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", chat_template=chat_template)

    return raw, make


def rendered(messages: list[dict]) -> str:
    """CHAT_TEMPLATE rendered by hand."""
    return "".join(f"<{m['role']}> {m['content']}\n" for m in messages)


def test_token_stats_use_the_chat_template(word_tokenizer, tmp_path: Path) -> None:
    raw, make = word_tokenizer
    path = DATA / "messages.jsonl"
    counts = [len(raw.encode(rendered(to_messages(r, DatasetFormat.MESSAGES))).ids) for _, r in iter_rows(path)]
    assert len(set(counts)) == 3  # rows of different lengths
    limit = sorted(counts)[1]
    report = validate_dataset(path, tokenizer=make(CHAT_TEMPLATE), max_length=limit)
    stats = report.token_stats
    assert report.ok and stats is not None
    assert (stats.count, stats.min, stats.max) == (3, min(counts), max(counts))
    assert stats.mean == pytest.approx(sum(counts) / 3)
    assert (stats.over_length, stats.max_length) == (1, limit)


def test_token_stats_of_preference_rows_take_the_longer_answer(word_tokenizer, tmp_path: Path) -> None:
    raw, make = word_tokenizer
    path = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "What is 2 + 2 ?", "chosen": "4", "rejected": "It is 2 + 2 . Blue ."}])
    report = validate_dataset(path, tokenizer=make(CHAT_TEMPLATE))
    prompt = [{"role": "user", "content": "What is 2 + 2 ?"}]
    longer = len(raw.encode(rendered(prompt + [{"role": "assistant", "content": "It is 2 + 2 . Blue ."}])).ids)
    shorter = len(raw.encode(rendered(prompt + [{"role": "assistant", "content": "4"}])).ids)
    assert longer > shorter
    assert (report.token_stats.min, report.token_stats.max, report.token_stats.over_length) == (longer, longer, 0)


def test_token_stats_without_chat_template_count_role_lines(word_tokenizer) -> None:
    raw, make = word_tokenizer
    path = DATA / "alpaca.jsonl"
    counts = [
        len(raw.encode("\n".join(f"{m['role']}: {m['content']}" for m in to_messages(r, DatasetFormat.ALPACA))).ids)
        for _, r in iter_rows(path)
    ]
    stats = validate_dataset(path, tokenizer=make(None)).token_stats
    assert (stats.count, stats.min, stats.max, stats.max_length) == (3, min(counts), max(counts), None)
    assert stats.mean == pytest.approx(sum(counts) / 3)


def test_rows_the_chat_template_rejects_are_reported(word_tokenizer) -> None:
    _, make = word_tokenizer
    strict = "{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}" + CHAT_TEMPLATE
    report = validate_dataset(DATA / "messages.jsonl", tokenizer=make(strict))
    assert [(e.row, e.field, e.reason) for e in report.errors] == [(1, "", "chat template failed: System role not supported")]
    assert report.valid_rows == 2 and report.token_stats.count == 2


def test_max_length_needs_a_tokenizer() -> None:
    with pytest.raises(InvalidArgument) as err:
        validate_dataset(DATA / "messages.jsonl", max_length=16)
    assert err.value.violations[0].field == "max_length"
