"""Dataset library shared by the registry (upload, validation) and training (loading rows): file-type and format detection, streaming parsing, validation.

Pure domain code (no gRPC, no S3). Rules:

- File types: JSONL, JSON (a top-level array, or an object whose ``"data"`` key holds the array)
  and Parquet, each optionally gzip-compressed (JSON/JSONL). The type comes from the extension
  (``.jsonl``/``.ndjson``, ``.parquet``/``.pq``) or, for ``.json`` and anything else, from the content.
- Row formats: ``messages`` (OpenAI chat), ``alpaca``, ``sharegpt``, ``preference`` and ``kto``
  (training sets), ``multiple_choice`` and ``qa`` (evaluation sets), detected per row from its keys.
  The dominant format of the valid rows is the file's format (or ``expected_format`` when given);
  every other row is reported.
- Evaluation rows: ``multiple_choice`` ``{"question": str, "choices": [str, ...] (>= 2, distinct),
  "answer": index | choice text | letter "A".., "id"?}`` and ``qa`` ``{"prompt": str,
  "reference": str, "id"?}``; an ``id`` (string or integer) must be unique within the file.
- Nothing is silently dropped: every row is either valid or reported as a :class:`RowError`
  with its 1-based row number (the line number for JSONL, the element index for JSON, the row
  index for Parquet), the field (``"messages[2].role"``, ``""`` for the whole row) and a reason.
  Errors about the file as a whole (no rows, no ``"data"`` array) use row 0.
- Files are streamed: JSONL line by line, JSON element by element, Parquet by record batches;
  the SHA-256 of the file bytes is computed in the same pass for JSON/JSONL.
- Images (see :mod:`services.core.image_datasets`): message content lists may hold image parts
  (``{"type": "image_url", "image_url": {"url": REF}}`` or ``{"type": "image", "image": REF}``) in
  system/user/tool messages, and ``multiple_choice``/``qa`` rows an ``images`` list of REFs. An image+text
  dataset is an archive (one data file + the images); :func:`validate_dataset` takes the archive itself,
  reads and decodes every image a row refers to and reports each bad one with its exact field.
"""

from __future__ import annotations

import codecs
import gzip
import hashlib
import io
import json
import re
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, cast

import pyarrow as pa
import pyarrow.parquet as pq
from jinja2 import TemplateError

from services.core.errors import FieldViolation, InvalidArgument, NotFound
from services.core.image_datasets import (
    IMAGE_PART_TYPES,
    ImageCheck,
    ImageError,
    conversation_image_refs,
    decode_image,
    image_refs,
    is_archive,
    opened_dataset,
    processor_token_count,
    read_image_bytes,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

__all__ = [
    "EVALUATION_FORMATS",
    "DatasetFormat",
    "FileType",
    "ImageCheck",
    "RowError",
    "TokenStats",
    "ValidationReport",
    "detect_file_type",
    "detect_row_format",
    "iter_rows",
    "row_errors",
    "to_kto",
    "to_multiple_choice",
    "to_qa",
    "to_messages",
    "to_preference",
    "validate_dataset",
]


class DatasetFormat(StrEnum):
    MESSAGES = "messages"
    ALPACA = "alpaca"
    SHAREGPT = "sharegpt"
    PREFERENCE = "preference"
    KTO = "kto"
    MULTIPLE_CHOICE = "multiple_choice"
    QA = "qa"


EVALUATION_FORMATS = frozenset({DatasetFormat.MULTIPLE_CHOICE, DatasetFormat.QA})


class FileType(StrEnum):
    JSONL = "jsonl"
    JSON = "json"
    PARQUET = "parquet"


@dataclass
class RowError:
    """One problem in one row: ``row`` is 1-based (0 for the file as a whole)."""

    row: int
    field: str
    reason: str


@dataclass
class TokenStats:
    """Token counts of the valid rows, rendered with the tokenizer's chat template."""

    count: int
    min: int
    mean: float
    max: int
    over_length: int
    max_length: int | None
    # Images of all rows, the most in one row, and the image tokens of the counted rows (with a
    # vision-language model's processor; included in the counts above).
    images: int = 0
    max_images_per_row: int = 0
    image_tokens: int = 0


@dataclass
class ValidationReport:
    file_type: str
    format: DatasetFormat | None
    row_count: int
    valid_rows: int
    errors: list[RowError]
    format_counts: dict[str, int]
    token_stats: TokenStats | None
    sha256: str
    size_bytes: int
    # Image references over all rows and the most in one row (image+text datasets).
    image_count: int = 0
    max_images_per_row: int = 0

    @property
    def ok(self) -> bool:
        """True when every row is valid and the format is known."""
        return not self.errors and self.format is not None

    @property
    def invalid_rows(self) -> int:
        """Rows that are not valid rows of ``format`` (``errors`` may be capped; this is not)."""
        return self.row_count - self.valid_rows


MESSAGE_ROLES = ("system", "user", "assistant", "tool")
SHAREGPT_ROLES: dict[str, str] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "function_call": "assistant",
    "observation": "tool",
    "tool": "tool",
}
_EMPTY_ANSWER = "assistant content is empty"
_MESSAGE_EXTRAS = ("name", "tool_calls", "tool_call_id")
_CHUNK = 1 << 20
_SNIFF_LIMIT = 1 << 20
_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"
_WHITESPACE = re.compile(r"[ \t\r\n]*")


# --------------------------------------------------------------------------- file reading


class _Digest:
    """SHA-256 and size of the bytes read from a file."""

    def __init__(self) -> None:
        self.sha256 = hashlib.sha256()
        self.size = 0

    def update(self, data: bytes | memoryview) -> None:
        self.sha256.update(data)
        self.size += len(data)

    def consume(self, raw: BinaryIO | io.RawIOBase) -> None:
        while chunk := raw.read(_CHUNK):
            self.update(chunk)


class _HashingReader(io.RawIOBase):
    """A raw reader that feeds every byte it reads into a :class:`_Digest`."""

    def __init__(self, raw: io.RawIOBase, digest: _Digest) -> None:
        self._raw = raw
        self._digest = digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = self._raw.readinto(buffer)
        if n:
            self._digest.update(memoryview(buffer)[:n])
        return n

    def drain(self) -> None:
        """Hash the bytes not read yet."""
        self._digest.consume(self._raw)


def _decompressed(stream: io.BufferedReader[Any]) -> BinaryIO:
    return cast(BinaryIO, gzip.GzipFile(fileobj=stream) if stream.peek(2)[:2] == _GZIP_MAGIC else stream)


_TYPE_NAMES = {
    type(None): "null",
    bool: "bool",
    int: "int",
    float: "float",
    str: "string",
    list: "list",
    dict: "object",
}


def _type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def detect_file_type(path: Path) -> FileType:
    """File type from the extension, or by sniffing the (decompressed) content.

    Content starting with ``[`` is JSON; content starting with ``{`` is JSONL when its first
    line is a complete row object, JSON otherwise (a ``{"data": [...]}`` wrapper, or a first line
    longer than 1 MiB: name such JSONL files ``.jsonl`` or pass ``file_type``).
    """
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    suffix = Path(name).suffix
    if suffix in (".parquet", ".pq"):
        return FileType.PARQUET
    if suffix in (".jsonl", ".ndjson"):
        return FileType.JSONL
    with open(path, "rb", buffering=0) as raw:
        buffered = io.BufferedReader(raw)
        if buffered.peek(4)[:4] == _PARQUET_MAGIC:
            return FileType.PARQUET
        try:
            head = _decompressed(buffered).read(_SNIFF_LIMIT)
        except (OSError, EOFError, zlib.error):
            return FileType.JSONL  # unreadable data is reported row by row
    text = head.removeprefix(codecs.BOM_UTF8).lstrip()
    if text.startswith(b"["):
        return FileType.JSON
    if not text.startswith(b"{"):
        return FileType.JSONL  # empty, or lines that are reported one by one
    line, newline, _ = text.partition(b"\n")
    if not newline and len(head) == _SNIFF_LIMIT:
        return FileType.JSON  # one huge first line
    try:
        first = json.loads(line)
    except (ValueError, RecursionError):
        return FileType.JSON  # an object spread over several lines
    is_wrapper = isinstance(first, dict) and isinstance(first.get("data"), list)
    return FileType.JSON if is_wrapper else FileType.JSONL


def _resolve_file_type(path: Path, file_type: str | None) -> FileType:
    if not path.is_file():
        raise NotFound(f"dataset file not found: {path}", reason="DATASET_FILE_NOT_FOUND")
    if file_type is None:
        return detect_file_type(path)
    try:
        return FileType(file_type.lower().lstrip("."))
    except ValueError:
        expected = ", ".join(FileType)
        raise InvalidArgument.for_field(
            "file_type", f"unknown file type {file_type!r} (expected one of {expected})"
        ) from None


def iter_rows(path: Path, file_type: str | None = None) -> Iterator[tuple[int, Any]]:
    """Stream ``(row_number, row)`` pairs from a dataset file.

    A row that cannot be read (malformed JSON line, bad UTF-8, corrupt data) is yielded as
    ``(row_number, RowError)`` instead of raising; an error about the whole file is yielded with
    row 0. Parquet rows come without their null fields (a null column value means "absent").
    Raises NotFound for a missing file and InvalidArgument for an unknown ``file_type``.
    """
    path = Path(path)
    return _rows(path, _resolve_file_type(path, file_type), None)


def _rows(path: Path, kind: FileType, digest: _Digest | None) -> Iterator[tuple[int, Any]]:
    if kind is FileType.PARQUET:
        if digest is not None:
            with open(path, "rb") as raw:
                digest.consume(raw)
        yield from _parquet_rows(path)
        return
    with open(path, "rb", buffering=0) as raw:
        source: io.RawIOBase = raw if digest is None else _HashingReader(raw, digest)
        stream = _decompressed(io.BufferedReader(source, _CHUNK))
        if kind is FileType.JSONL:
            yield from _jsonl_rows(stream)
        else:
            yield from _JsonRows(stream).rows()
        if isinstance(source, _HashingReader):
            source.drain()


def _jsonl_rows(stream: BinaryIO) -> Iterator[tuple[int, Any]]:
    line_no = 0
    while True:
        try:
            line = stream.readline()
        except (OSError, EOFError, zlib.error) as exc:
            yield line_no + 1, RowError(line_no + 1, "", f"unreadable file data: {exc}")
            return
        if not line:
            return
        line_no += 1
        if line_no == 1:
            line = line.removeprefix(codecs.BOM_UTF8)
        if not line.strip():
            continue  # blank lines hold no row; row numbers stay line numbers
        try:
            value = json.loads(line.decode("utf-8"))
        except UnicodeDecodeError as exc:
            yield line_no, RowError(line_no, "", f"invalid UTF-8: {exc.reason} at byte {exc.start}")
            continue
        except RecursionError:
            yield line_no, RowError(line_no, "", "invalid JSON: nesting too deep")
            continue
        except ValueError as exc:
            yield line_no, RowError(line_no, "", f"invalid JSON: {exc}")
            continue
        yield line_no, value


class _Malformed(Exception):
    def __init__(self, row: int, field_name: str, reason: str) -> None:
        super().__init__(reason)
        self.error = RowError(row, field_name, reason)


def _may_continue(exc: json.JSONDecodeError, buffered: int) -> bool:
    """Whether a decode error may only mean the value goes on past the buffered text."""
    return exc.msg.startswith("Unterminated string") or exc.pos >= buffered - 8


class _JsonRows:
    """Streams the rows of a JSON array, or of the ``"data"`` array of a top-level object."""

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._text = codecs.getincrementaldecoder("utf-8-sig")()
        self._decoder = json.JSONDecoder()
        self._buf = ""
        self._pos = 0
        self._base = 0  # characters dropped from the front of the buffer
        self._eof = False
        self._row = 0
        self._in_rows = False

    def rows(self) -> Iterator[tuple[int, Any]]:
        try:
            first = self._peek()
            if not first:
                return
            self._pos += 1
            if first == "[":
                yield from self._array()
            elif first == "{":
                yield from self._object()
            else:
                raise self._malformed('a JSON dataset must be an array of rows or an object with a "data" array')
            if self._peek():
                raise self._malformed(f"invalid JSON: extra data after the rows at char {self._base + self._pos}")
        except _Malformed as exc:
            yield exc.error.row, exc.error

    def _malformed(self, reason: str, field_name: str = "") -> _Malformed:
        return _Malformed(self._row + 1 if self._in_rows else 0, field_name, reason)

    def _fill(self, size: int) -> bool:
        """Append up to ``size`` more bytes to the buffer; False at the end of the input."""
        if self._eof:
            return False
        try:
            data = self._stream.read(size)
            self._eof = not data
            text = self._text.decode(data, final=self._eof)
        except UnicodeDecodeError as exc:
            raise self._malformed(f"invalid UTF-8: {exc.reason}") from None
        except (OSError, EOFError, zlib.error) as exc:
            raise self._malformed(f"unreadable file data: {exc}") from None
        self._base += self._pos
        self._buf = self._buf[self._pos :] + text
        self._pos = 0
        return not self._eof

    def _peek(self) -> str:
        """Skip whitespace; the next character, or '' at the end of the input."""
        while True:
            self._pos = _WHITESPACE.match(self._buf, self._pos).end()  # type: ignore[union-attr]
            if self._pos < len(self._buf):
                return self._buf[self._pos]
            if not self._fill(_CHUNK):
                return ""

    def _value(self) -> Any:
        self._peek()
        size = _CHUNK
        while True:
            try:
                value, end = self._decoder.raw_decode(self._buf, self._pos)
                # a value that ends exactly at the buffer's end may continue (e.g. a number)
                if end < len(self._buf) or self._eof:
                    self._pos = end
                    return value
            except json.JSONDecodeError as exc:
                if self._eof or not _may_continue(exc, len(self._buf)):
                    raise self._malformed(f"invalid JSON: {exc.msg} at char {self._base + exc.pos}") from None
            except RecursionError:
                raise self._malformed("invalid JSON: nesting too deep") from None
            self._fill(size)
            size *= 2

    def _array(self) -> Iterator[tuple[int, Any]]:
        self._in_rows = True
        if self._peek() == "]":
            self._pos += 1
        else:
            while True:
                value = self._value()
                self._row += 1
                yield self._row, value
                sep = self._peek()
                if sep not in (",", "]"):
                    found = f"found {sep!r}" if sep else "the file ends"
                    raise self._malformed(f"invalid JSON: expected ',' or ']' after row {self._row}, {found}")
                self._pos += 1
                if sep == "]":
                    break
        self._in_rows = False

    def _object(self) -> Iterator[tuple[int, Any]]:
        has_data = False
        nxt = self._peek()
        if nxt == "}":
            self._pos += 1
        else:
            while True:
                if nxt != '"':
                    raise self._malformed("invalid JSON: expected a property name in double quotes")
                key = self._value()
                if self._peek() != ":":
                    raise self._malformed("invalid JSON: expected ':' after a property name")
                self._pos += 1
                if key == "data":
                    if self._peek() != "[":
                        raise self._malformed("must be an array of rows", "data")
                    self._pos += 1
                    has_data = True
                    yield from self._array()
                else:
                    self._value()  # metadata beside the rows
                sep = self._peek()
                if sep not in (",", "}"):
                    raise self._malformed("invalid JSON: expected ',' or '}' in the top-level object")
                self._pos += 1
                if sep == "}":
                    break
                nxt = self._peek()
        if not has_data:
            raise self._malformed(
                'missing required field (a JSON object dataset holds its rows in a "data" array)', "data"
            )


def _drop_nulls(value: Any) -> Any:
    """Parquet columns are shared by all rows: a null there means the field is absent."""
    if isinstance(value, dict):
        return {k: _drop_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_drop_nulls(v) for v in value]
    return value


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    row = 0
    try:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                row += 1
                yield row, _drop_nulls(record)
    except (pa.ArrowException, OSError) as exc:
        at = row + 1 if row else 0
        yield at, RowError(at, "", f"invalid Parquet data: {exc}")


# --------------------------------------------------------------------------- row formats

_Issues = list[tuple[str, str]]


def detect_row_format(row: Any) -> DatasetFormat | None:
    """The format a row's keys point to (None when they match no format)."""
    if not isinstance(row, dict):
        return None
    keys = {k for k, v in row.items() if v is not None}
    if keys & {"chosen", "rejected"}:
        return DatasetFormat.PREFERENCE
    if "completion" in keys or {"prompt", "label"} <= keys:
        return DatasetFormat.KTO
    if "messages" in keys:
        return DatasetFormat.MESSAGES
    if "conversations" in keys:
        return DatasetFormat.SHAREGPT
    if keys & {"instruction", "output"}:
        return DatasetFormat.ALPACA
    # Evaluation formats last: a row any training format claims keeps that format.
    if "choices" in keys or {"question", "answer"} <= keys:
        return DatasetFormat.MULTIPLE_CHOICE
    if "reference" in keys:
        return DatasetFormat.QA
    return None


def _content_text(content: Any) -> str:
    """The text of a content (image parts left out)."""
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content if part.get("type") == "text")
    return content or ""


def _has_images(content: Any) -> bool:
    return isinstance(content, list) and any(isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES for p in content)


_PART_SHAPES = '{"type": "text", "text": str} or an image part {"type": "image_url", "image_url": {"url": str}}'
_REF_SHAPE = "an image path inside the dataset archive, a data: URL or an http(s) URL"


def _check_image_ref(ref: Any, fld: str, issues: _Issues) -> None:
    if ref is None:
        issues.append((fld, "missing required field"))
    elif not isinstance(ref, str):
        issues.append((fld, f"must be a string ({_REF_SHAPE}), got {_type_name(ref)}"))
    elif not ref.strip():
        issues.append((fld, f"must not be empty ({_REF_SHAPE})"))


def _check_image_part(part: dict, fld: str, role: Any, issues: _Issues) -> bool:
    """Check one image content part; False when it makes the content invalid."""
    if role == "assistant":
        issues.append((fld, "an assistant message cannot hold images (put them in a user message)"))
        return False
    before = len(issues)
    if part.get("type") == "image_url":
        inner = part.get("image_url")
        if isinstance(inner, dict):
            _check_image_ref(inner.get("url"), f"{fld}.image_url.url", issues)
        elif isinstance(inner, str):
            _check_image_ref(inner, f"{fld}.image_url", issues)
        else:
            _check_image_ref(inner, f"{fld}.image_url.url", issues)
    else:
        _check_image_ref(part.get("image"), f"{fld}.image", issues)
    return len(issues) == before


def _check_content(msg: dict, prefix: str, role: Any, issues: _Issues) -> bool:
    """Check a message's content; True when it is a non-empty assistant answer."""
    content = msg.get("content")
    tool_calls = msg.get("tool_calls")
    fld = f"{prefix}.content"
    if content is None:
        if role == "assistant" and tool_calls:
            return False
        issues.append((fld, "missing required field"))
        return False
    if isinstance(content, list):
        for j, part in enumerate(content):
            if isinstance(part, dict) and part.get("type") in IMAGE_PART_TYPES:
                if not _check_image_part(part, f"{fld}[{j}]", role, issues):
                    return False
                continue
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                got = f"type {part.get('type')!r}" if isinstance(part, dict) else _type_name(part)
                issues.append((f"{fld}[{j}]", f"must be a text part {_PART_SHAPES}, got {got}"))
                return False
    elif not isinstance(content, str):
        issues.append((fld, f"must be a string or a list of text parts, got {_type_name(content)}"))
        return False
    if role != "assistant":
        return False
    if _content_text(content).strip():
        return True
    if not tool_calls:
        issues.append((fld, _EMPTY_ANSWER))
    return False


def _check_messages(value: Any, fld: str, issues: _Issues, *, need_answer: bool, start: bool = True) -> None:
    """Check a list of messages; ``start``: it is a conversation from its beginning (not the answer part of a
    preference/KTO row), so its role order is checked too."""
    if not isinstance(value, list):
        issues.append((fld, f"must be a list of messages, got {_type_name(value)}"))
        return
    if not value:
        issues.append((fld, "must not be empty"))
        return
    answered = explained = False  # explained: a bad role or a bad answer already tells why
    for i, msg in enumerate(value):
        prefix = f"{fld}[{i}]"
        if not isinstance(msg, dict):
            issues.append((prefix, f"must be a message object, got {_type_name(msg)}"))
            explained = True
            continue
        role = msg.get("role")
        if role is None:
            issues.append((f"{prefix}.role", "missing required field"))
        elif not isinstance(role, str):
            issues.append((f"{prefix}.role", f"must be a string, got {_type_name(role)}"))
        elif role not in MESSAGE_ROLES:
            issues.append((f"{prefix}.role", f"unknown role {role!r} (expected one of {', '.join(MESSAGE_ROLES)})"))
        before = len(issues)
        answered |= _check_content(msg, prefix, role, issues)
        explained |= role not in MESSAGE_ROLES or (role == "assistant" and len(issues) > before)
    roles = [m.get("role") if isinstance(m, dict) else None for m in value]
    if start and all(r in MESSAGE_ROLES for r in roles):
        order = _role_order_issue(cast(list[str], roles), fld)
        if order:
            issues.append(order)
            explained = True
    if need_answer and not answered and not explained:
        issues.append((fld, "needs at least one assistant message with content"))


def _role_order_issue(roles: list[str], fld: str) -> tuple[str, str] | None:
    """The first role out of order in a conversation, as chat templates and trainers need it: an optional
    system message first, then a user message; an assistant message answers a user or tool message; a tool
    message follows an assistant (tool call) or another tool message. Two user messages in a row are kept
    (a template renders them as two turns)."""
    for i, role in enumerate(roles):
        previous = roles[i - 1] if i else None
        if role == "system" and i:
            return f"{fld}[{i}].role", "a system message must be the first message"
        if previous in (None, "system") and role != "system" and role != "user":
            return f"{fld}[{i}].role", (
                f"the conversation must start with a user message (after an optional system message), got {role!r}"
            )
        if role == "assistant" and previous not in ("user", "tool"):
            return f"{fld}[{i}].role", f"an assistant message must answer a user or tool message, not {previous!r}"
        if role == "tool" and previous not in ("assistant", "tool"):
            return f"{fld}[{i}].role", f"a tool message must follow an assistant message, not {previous!r}"
    return None


def _check_text(row: dict, key: str, issues: _Issues, *, required: bool, non_empty: bool = False) -> None:
    value = row.get(key)
    if value is None:
        if required:
            issues.append((key, "missing required field"))
    elif not isinstance(value, str):
        issues.append((key, f"must be a string, got {_type_name(value)}"))
    elif non_empty and not value.strip():
        issues.append((key, "must not be empty"))


def _check_alpaca(row: dict, issues: _Issues) -> None:
    _check_text(row, "instruction", issues, required=True)
    _check_text(row, "input", issues, required=False)
    _check_text(row, "output", issues, required=True, non_empty=True)
    _check_text(row, "system", issues, required=False)
    instruction, query = row.get("instruction"), row.get("input") or ""
    if isinstance(instruction, str) and isinstance(query, str) and not (instruction.strip() or query.strip()):
        issues.append(("instruction", "must not be empty"))
    history = row.get("history")
    if history is None:
        return
    if not isinstance(history, list):
        issues.append(("history", f"must be a list of [instruction, output] pairs, got {_type_name(history)}"))
        return
    for i, pair in enumerate(history):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            issues.append((f"history[{i}]", "must be an [instruction, output] pair of strings"))


def _check_sharegpt(row: dict, issues: _Issues) -> None:
    _check_text(row, "system", issues, required=False)
    turns = row.get("conversations")
    if not isinstance(turns, list):
        issues.append(("conversations", f"must be a list of turns, got {_type_name(turns)}"))
        return
    if not turns:
        issues.append(("conversations", "must not be empty"))
        return
    answered = explained = False  # explained: a bad role or an empty answer already tells why
    for i, turn in enumerate(turns):
        prefix = f"conversations[{i}]"
        if not isinstance(turn, dict):
            issues.append((prefix, f"must be a turn object, got {_type_name(turn)}"))
            explained = True
            continue
        speaker, value = turn.get("from"), turn.get("value")
        if speaker is None:
            issues.append((f"{prefix}.from", "missing required field"))
        elif not isinstance(speaker, str):
            issues.append((f"{prefix}.from", f"must be a string, got {_type_name(speaker)}"))
        elif speaker not in SHAREGPT_ROLES:
            issues.append((f"{prefix}.from", f"unknown role {speaker!r} (expected one of {', '.join(SHAREGPT_ROLES)})"))
        role = SHAREGPT_ROLES.get(speaker) if isinstance(speaker, str) else None
        explained |= role is None
        if value is None:
            issues.append((f"{prefix}.value", "missing required field"))
        elif not isinstance(value, str):
            issues.append((f"{prefix}.value", f"must be a string, got {_type_name(value)}"))
            explained |= role == "assistant"
        elif role == "assistant":
            if value.strip():
                answered = True
            else:
                issues.append((f"{prefix}.value", _EMPTY_ANSWER))
                explained = True
    if not answered and not explained:
        issues.append(("conversations", "needs at least one gpt turn with content"))


def _check_prompt(value: Any, fld: str, issues: _Issues) -> None:
    if isinstance(value, str):
        if not value.strip():
            issues.append((fld, "must not be empty"))
    elif isinstance(value, list):
        _check_messages(value, fld, issues, need_answer=False)
    else:
        issues.append((fld, f"must be a string or a list of messages, got {_type_name(value)}"))


def _check_answer(value: Any, fld: str, issues: _Issues) -> None:
    if isinstance(value, str):
        if not value.strip():
            issues.append((fld, "must not be empty"))
    elif isinstance(value, dict):
        role = value.get("role", "assistant")
        if role != "assistant":
            issues.append((f"{fld}.role", f"must be 'assistant', got {role!r}"))
        else:
            _check_content(value, fld, "assistant", issues)
    elif isinstance(value, list):
        _check_messages(value, fld, issues, need_answer=True, start=False)
    else:
        issues.append((fld, f"must be a string, an assistant message or a list of messages, got {_type_name(value)}"))


def _check_preference(row: dict, issues: _Issues) -> None:
    if row.get("messages") is not None:
        _check_messages(row["messages"], "messages", issues, need_answer=False)
    elif row.get("prompt") is not None:
        _check_prompt(row["prompt"], "prompt", issues)
    else:
        issues.append(("prompt", "missing required field"))
    before = len(issues)
    for key in ("chosen", "rejected"):
        if row.get(key) is None:
            issues.append((key, "missing required field"))
        else:
            _check_answer(row[key], key, issues)
    if len(issues) == before and _answer_messages(row["chosen"]) == _answer_messages(row["rejected"]):
        issues.append(("rejected", "must differ from chosen"))


def _check_kto(row: dict, issues: _Issues) -> None:
    if row.get("prompt") is None:
        issues.append(("prompt", "missing required field"))
    else:
        _check_prompt(row["prompt"], "prompt", issues)
    if row.get("completion") is None:
        issues.append(("completion", "missing required field"))
    else:
        _check_answer(row["completion"], "completion", issues)
    label = row.get("label")
    if label is None:
        issues.append(("label", "missing required field"))
    elif not isinstance(label, bool):
        issues.append(("label", f"must be a boolean, got {_type_name(label)}"))


_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _check_id(row: dict, issues: _Issues) -> None:
    value = row.get("id")
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        issues.append(("id", f"must be a string or an integer, got {_type_name(value)}"))
    elif isinstance(value, str) and not value.strip():
        issues.append(("id", "must not be empty"))


def _answer_index(answer: Any, choices: list[str]) -> tuple[int | None, str]:
    """The index ``answer`` points to in ``choices`` (valid, distinct strings), or None and why not."""
    n = len(choices)
    if isinstance(answer, bool) or not isinstance(answer, (int, str)):
        return None, f"must be a choice index, the choice text or a letter, got {_type_name(answer)}"
    if isinstance(answer, int):
        if not 0 <= answer < n:
            return None, f"index {answer} out of range ({n} choices: 0-{n - 1})"
        return answer, ""
    by_text = choices.index(answer) if answer in choices else None
    letter = _LETTERS.index(answer) if len(answer) == 1 and answer in _LETTERS else None
    if by_text is not None:
        if letter is not None and letter < n and letter != by_text:
            return None, f"{answer!r} is ambiguous: the text of choice {by_text} and the letter of choice {letter}"
        return by_text, ""
    if letter is not None:
        if letter >= n:
            return None, f"letter {answer!r} out of range ({n} choices: A-{_LETTERS[n - 1]})"
        return letter, ""
    return None, f"{answer!r} is neither the text of a choice nor a letter A-{_LETTERS[n - 1]}"


def _check_multiple_choice(row: dict, issues: _Issues) -> None:
    _check_text(row, "question", issues, required=True, non_empty=True)
    choices = row.get("choices")
    valid_choices = False
    if choices is None:
        issues.append(("choices", "missing required field"))
    elif not isinstance(choices, list):
        issues.append(("choices", f"must be a list of strings, got {_type_name(choices)}"))
    elif len(choices) < 2:
        issues.append(("choices", f"needs at least 2 choices, got {len(choices)}"))
    elif len(choices) > len(_LETTERS):
        issues.append(("choices", f"at most {len(_LETTERS)} choices, got {len(choices)}"))
    else:
        before = len(issues)
        seen: dict[str, int] = {}
        for i, choice in enumerate(choices):
            if not isinstance(choice, str):
                issues.append((f"choices[{i}]", f"must be a string, got {_type_name(choice)}"))
            elif not choice.strip():
                issues.append((f"choices[{i}]", "must not be empty"))
            elif choice in seen:
                issues.append((f"choices[{i}]", f"duplicate of choices[{seen[choice]}]"))
            else:
                seen[choice] = i
        valid_choices = len(issues) == before
    answer = row.get("answer")
    if answer is None:
        issues.append(("answer", "missing required field"))
    elif valid_choices:
        index, why = _answer_index(answer, choices)  # type: ignore[arg-type]
        if index is None:
            issues.append(("answer", why))
    _check_id(row, issues)
    _check_images_list(row, issues)


def _check_qa(row: dict, issues: _Issues) -> None:
    _check_text(row, "prompt", issues, required=True, non_empty=True)
    _check_text(row, "reference", issues, required=True, non_empty=True)
    _check_id(row, issues)
    _check_images_list(row, issues)


def _check_images_list(row: dict, issues: _Issues) -> None:
    """An evaluation row's optional ``images``: a list of REFs (or ``{"url": REF}``), shown before the text."""
    images = row.get("images")
    if images is None:
        return
    if not isinstance(images, list):
        issues.append(("images", f"must be a list of images ({_REF_SHAPE}), got {_type_name(images)}"))
        return
    for i, ref in enumerate(images):
        _check_image_ref(ref.get("url") if isinstance(ref, dict) else ref, f"images[{i}]", issues)


def _no_images_list(row: dict, issues: _Issues) -> None:
    """Training rows carry images in their messages: a top-level ``images`` list would be silently unused."""
    if row.get("images") is not None:
        issues.append(
            (
                "images",
                "a top-level images list is read only in multiple_choice and qa rows; put each "
                'image in a user message\'s content as {"type": "image_url", "image_url": '
                '{"url": REF}}',
            )
        )


_CHECKS = {
    DatasetFormat.MESSAGES: lambda row, issues: _check_messages(
        row.get("messages"), "messages", issues, need_answer=True
    ),
    DatasetFormat.ALPACA: _check_alpaca,
    DatasetFormat.SHAREGPT: _check_sharegpt,
    DatasetFormat.PREFERENCE: _check_preference,
    DatasetFormat.KTO: _check_kto,
    DatasetFormat.MULTIPLE_CHOICE: _check_multiple_choice,
    DatasetFormat.QA: _check_qa,
}
_TRAINING_FORMATS = (
    DatasetFormat.MESSAGES,
    DatasetFormat.ALPACA,
    DatasetFormat.SHAREGPT,
    DatasetFormat.PREFERENCE,
    DatasetFormat.KTO,
)


def row_errors(row: Any, fmt: DatasetFormat) -> list[tuple[str, str]]:
    """The ``(field, reason)`` problems of ``row`` read as a row of format ``fmt`` (empty: valid)."""
    if not isinstance(row, dict):
        return [("", f"row must be a JSON object, got {_type_name(row)}")]
    issues: _Issues = []
    fmt = DatasetFormat(fmt)
    _CHECKS[fmt](row, issues)
    if fmt in _TRAINING_FORMATS:
        _no_images_list(row, issues)
    return issues


def _require_valid(row: Any, fmt: DatasetFormat) -> None:
    issues = row_errors(row, fmt)
    if issues:
        detail = "; ".join(f"{f or 'row'}: {r}" for f, r in issues)
        raise InvalidArgument(
            f"not a valid {fmt} row: {detail}",
            reason="INVALID_DATASET_ROW",
            violations=[FieldViolation(f, r) for f, r in issues],
        )


# --------------------------------------------------------------------------- normalisation


def _message(msg: dict) -> dict:
    content = msg.get("content")
    # A content with images stays a list of parts (text and image parts as given); text-only content is text.
    parts = content if isinstance(content, list) and _has_images(content) else None
    out = {
        "role": msg.get("role", "assistant"),
        "content": [dict(p) for p in parts] if parts is not None else _content_text(content),
    }
    out.update({k: msg[k] for k in _MESSAGE_EXTRAS if msg.get(k) is not None})
    return out


def _prompt_messages(value: str | list) -> list[dict]:
    return [{"role": "user", "content": value}] if isinstance(value, str) else [_message(m) for m in value]


def _answer_messages(value: str | dict | list) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "assistant", "content": value}]
    if isinstance(value, dict):
        return [_message(value)]
    return [_message(m) for m in value]


def to_messages(row: dict, fmt: DatasetFormat) -> list[dict]:
    """A valid ``messages``/``alpaca``/``sharegpt``/``multiple_choice``/``qa`` row as OpenAI chat messages.

    Content lists of text parts are joined with newlines; a content list holding image parts stays a
    list of parts (as given). An alpaca ``input`` follows the ``instruction`` on a new line. A ``qa`` row is
    its prompt and reference; a ``multiple_choice`` row is the question with lettered choices and the
    answer's letter (see :func:`to_multiple_choice`); their ``images`` become image parts before the text.
    Raises InvalidArgument (with field violations) for an invalid row.
    """
    fmt = DatasetFormat(fmt)
    if fmt in (DatasetFormat.PREFERENCE, DatasetFormat.KTO):
        raise InvalidArgument.for_field("format", f"{fmt} rows are converted with to_preference / to_kto")
    _require_valid(row, fmt)
    return _messages_of(row, fmt)


def _messages_of(row: dict, fmt: DatasetFormat) -> list[dict]:
    if fmt is DatasetFormat.QA:
        return [
            {"role": "user", "content": _with_images(row["prompt"], row)},
            {"role": "assistant", "content": row["reference"]},
        ]
    if fmt is DatasetFormat.MULTIPLE_CHOICE:
        mc = _multiple_choice_of(row)
        lines = [mc["question"], *(f"{_LETTERS[i]}. {c}" for i, c in enumerate(mc["choices"]))]
        answer = _LETTERS[mc["answer_index"]]
        return [
            {"role": "user", "content": _with_images("\n".join(lines), row)},
            {"role": "assistant", "content": answer},
        ]
    if fmt is DatasetFormat.MESSAGES:
        return [_message(m) for m in row["messages"]]
    if fmt is DatasetFormat.SHAREGPT:
        messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
        return messages + [{"role": SHAREGPT_ROLES[t["from"]], "content": t["value"]} for t in row["conversations"]]
    messages = [{"role": "system", "content": row["system"]}] if row.get("system") else []
    for query, answer in row.get("history") or []:
        messages += [{"role": "user", "content": query}, {"role": "assistant", "content": answer}]
    prompt = "\n".join(part for part in (row["instruction"], row.get("input") or "") if part)
    return messages + [{"role": "user", "content": prompt}, {"role": "assistant", "content": row["output"]}]


def _row_images(row: dict) -> list[Any]:
    return [ref.get("url") if isinstance(ref, dict) else ref for ref in row.get("images") or []]


def _with_images(text: str, row: dict) -> str | list[dict]:
    """An evaluation row's prompt text, after image parts for its ``images`` when it has any."""
    images = _row_images(row)
    if not images:
        return text
    return [*({"type": "image_url", "image_url": {"url": ref}} for ref in images), {"type": "text", "text": text}]


def to_preference(row: dict, fmt: DatasetFormat) -> dict[str, list[dict]]:
    """A valid preference row as ``{"prompt_messages", "chosen", "rejected"}`` message lists."""
    fmt = DatasetFormat(fmt)
    if fmt is not DatasetFormat.PREFERENCE:
        raise InvalidArgument.for_field("format", f"to_preference needs {DatasetFormat.PREFERENCE} rows, got {fmt}")
    _require_valid(row, fmt)
    return _preference_of(row)


def _preference_of(row: dict) -> dict[str, list[dict]]:
    prompt = row["messages"] if row.get("messages") is not None else row["prompt"]
    return {
        "prompt_messages": _prompt_messages(prompt),
        "chosen": _answer_messages(row["chosen"]),
        "rejected": _answer_messages(row["rejected"]),
    }


def to_kto(row: dict) -> dict[str, Any]:
    """A valid KTO row as ``{"prompt_messages", "completion", "label"}`` (completion: message list)."""
    _require_valid(row, DatasetFormat.KTO)
    return _kto_of(row)


def _kto_of(row: dict) -> dict[str, Any]:
    return {
        "prompt_messages": _prompt_messages(row["prompt"]),
        "completion": _answer_messages(row["completion"]),
        "label": row["label"],
    }


def to_multiple_choice(row: dict) -> dict[str, Any]:
    """A valid ``multiple_choice`` row as ``{"id", "question", "choices", "answer_index"}``.

    ``answer`` (an index, the text of a choice or its letter) becomes a 0-based index; ``id`` is
    the row's own (as a string) or None; a row with ``images`` also has ``"images"`` (its REFs). Raises
    InvalidArgument for an invalid row.
    """
    _require_valid(row, DatasetFormat.MULTIPLE_CHOICE)
    return _multiple_choice_of(row)


def _multiple_choice_of(row: dict) -> dict[str, Any]:
    index, _ = _answer_index(row["answer"], row["choices"])
    out = {"id": _row_id(row), "question": row["question"], "choices": list(row["choices"]), "answer_index": index}
    if row.get("images"):
        out["images"] = _row_images(row)
    return out


def to_qa(row: dict) -> dict[str, Any]:
    """A valid ``qa`` row as ``{"id", "prompt", "reference"}`` (``id`` as a string, or None; ``"images"``, its
    REFs, when the row has images)."""
    _require_valid(row, DatasetFormat.QA)
    out = {"id": _row_id(row), "prompt": row["prompt"], "reference": row["reference"]}
    if row.get("images"):
        out["images"] = _row_images(row)
    return out


def _row_id(row: dict) -> str | None:
    value = row.get("id")
    return None if value is None else str(value)


def _conversations(row: dict, fmt: DatasetFormat) -> list[list[dict]]:
    """The full conversations a valid row trains on (two for preference rows)."""
    if fmt is DatasetFormat.PREFERENCE:
        pref = _preference_of(row)
        return [pref["prompt_messages"] + pref["chosen"], pref["prompt_messages"] + pref["rejected"]]
    if fmt is DatasetFormat.KTO:
        kto = _kto_of(row)
        return [kto["prompt_messages"] + kto["completion"]]
    return [_messages_of(row, fmt)]


def _token_count(tokenizer: PreTrainedTokenizerBase, messages: list[dict]) -> int:
    if tokenizer.chat_template:
        return len(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=False))
    return len(tokenizer.encode("\n".join(f"{m['role']}: {m['content']}" for m in messages)))


# --------------------------------------------------------------------------- validation


@dataclass
class _FormatTally:
    """What one format's rows looked like; row lists are capped at ``max_errors``."""

    first_row: int
    rows: int = 0
    valid: int = 0
    row_numbers: list[int] = field(default_factory=list)
    errors: list[RowError] = field(default_factory=list)
    tokens: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0, 0])  # count, min, sum, max, over, image tokens
    ids: dict[str, int] = field(default_factory=dict)  # evaluation rows: id -> first row number


class _Tally:
    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase | None,
        max_length: int | None,
        max_errors: int,
        images: ImageCheck | None = None,
        image_dir: Path | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.max_errors = max_errors
        self.row_count = 0
        self.general: list[RowError] = []  # unreadable and unrecognised rows, file-level errors
        self.formats: dict[DatasetFormat, _FormatTally] = {}
        self.images = images or ImageCheck()
        self.policy = self.images.policy(image_dir)
        self.processor = self.images.processor
        self.counting = tokenizer is not None or self.processor is not None
        self.image_count = 0
        self.max_images_per_row = 0

    def add(self, row_no: int, value: Any) -> None:
        if row_no:
            self.row_count += 1
        if isinstance(value, RowError):
            self._cap(self.general, [value])
            return
        fmt = detect_row_format(value)
        if fmt is None:
            if isinstance(value, dict):
                keys = ", ".join(sorted(str(k) for k, v in value.items() if v is not None)) or "none"
                reason = f"unrecognised row: fields match no known format ({', '.join(DatasetFormat)}); non-null keys: {keys}"
            else:
                reason = f"row must be a JSON object, got {_type_name(value)}"
            self._cap(self.general, [RowError(row_no, "", reason)])
            return
        tally = self.formats.setdefault(fmt, _FormatTally(first_row=row_no))
        tally.rows += 1
        self._cap(tally.row_numbers, [row_no])
        issues = row_errors(value, fmt)
        decoded = self._check_images(value, issues)
        if not issues and fmt in EVALUATION_FORMATS:
            issues = self._check_unique_id(row_no, value, tally)
        if not issues and self.counting:
            issues = self._count_tokens(value, fmt, tally, decoded)
        if issues:
            self._cap(tally.errors, [RowError(row_no, f, r) for f, r in issues])
        else:
            tally.valid += 1

    @staticmethod
    def _check_unique_id(row_no: int, row: dict, tally: _FormatTally) -> _Issues:
        row_id = _row_id(row)
        if row_id is None:
            return []
        first = tally.ids.setdefault(row_id, row_no)
        return [] if first == row_no else [("id", f"duplicate id {row_id!r} (first used in row {first})")]

    def _check_images(self, row: dict, issues: _Issues) -> dict[str, Any]:
        """Read and decode every image the row refers to (appending an issue per bad one); the decoded images
        by REF. A REF whose part is already reported is not read again."""
        refs = list(image_refs(row))
        self.image_count += len(refs)
        self.max_images_per_row = max(self.max_images_per_row, len(refs))
        decoded: dict[str, Any] = {}
        if not refs:
            return decoded
        check = self.images
        model = f"model {check.model}" if check.model else "the model"
        bad = {f for f, _ in issues}
        if not check.takes_images:
            issues += [(fld, f"{model} takes no images (a text-only model)") for fld, _ in refs if fld not in bad]
            return decoded
        limit = check.max_images_per_row
        if limit and len(refs) > limit:
            issues.append(
                (refs[limit][0], f"{len(refs)} images in this row, more than the {limit} {model} takes per row")
            )
        for fld, ref in refs:
            part = fld.rsplit(".image", 1)[0] if ".content[" in fld else fld
            if fld in bad or part in bad or (fld.startswith("images[") and "images" in bad):
                continue
            try:
                decoded[ref] = decode_image(read_image_bytes(ref, self.policy))
            except ImageError as exc:
                issues.append((fld, str(exc)))
        return decoded

    def _count_tokens(
        self, row: dict, fmt: DatasetFormat, tally: _FormatTally, decoded: dict[str, Any] | None = None
    ) -> _Issues:
        decoded = decoded or {}
        image_tokens = 0
        try:
            if self.processor is not None:
                counts = [
                    processor_token_count(self.processor, conv, [decoded[r] for r in conversation_image_refs(conv)])
                    for conv in _conversations(row, fmt)
                ]
                n, image_tokens = max(c[0] for c in counts), counts[0][1]
            else:
                n = max(_token_count(self.tokenizer, conv) for conv in _conversations(row, fmt))  # type: ignore[arg-type]
        except (TemplateError, TypeError, ValueError, KeyError) as exc:
            return [("", f"chat template failed: {exc}")]
        t = tally.tokens
        t[5] += image_tokens
        t[1] = n if t[0] == 0 else min(t[1], n)
        t[0] += 1
        t[2] += n
        t[3] = max(t[3], n)
        t[4] += int(self.max_length is not None and n > self.max_length)
        return []

    def _cap(self, target: list, items: list) -> None:
        target.extend(items[: max(self.max_errors - len(target), 0)])

    def report(self, file_type: FileType, expected: DatasetFormat | None, digest: _Digest) -> ValidationReport:
        target = expected
        if target is None and self.formats:
            target = max(
                self.formats, key=lambda f: (self.formats[f].valid, self.formats[f].rows, -self.formats[f].first_row)
            )
        errors = list(self.general)
        for fmt, tally in self.formats.items():
            if fmt is target:
                errors += tally.errors
                continue
            reason = (
                f"row is in {fmt} format, expected {target}"
                if expected is not None
                else f"row is in {fmt} format, but most rows are {target}"
            )
            errors += [RowError(n, "", reason) for n in tally.row_numbers]
        if self.row_count == 0 and not errors:
            errors.append(RowError(0, "", "dataset has no rows"))
        errors.sort(key=lambda e: e.row)
        chosen = self.formats.get(target) if target is not None else None
        token_stats = None
        if self.counting:
            count, low, total, high, over, image_tokens = chosen.tokens if chosen else [0, 0, 0, 0, 0, 0]
            token_stats = TokenStats(
                count,
                low,
                total / count if count else 0.0,
                high,
                over,
                self.max_length,
                self.image_count,
                self.max_images_per_row,
                image_tokens,
            )
        return ValidationReport(
            file_type=str(file_type),
            format=target,
            row_count=self.row_count,
            valid_rows=chosen.valid if chosen else 0,
            errors=errors[: self.max_errors],
            format_counts={str(f): t.rows for f, t in sorted(self.formats.items(), key=lambda kv: -kv[1].rows)},
            token_stats=token_stats,
            sha256=digest.sha256.hexdigest(),
            size_bytes=digest.size,
            image_count=self.image_count,
            max_images_per_row=self.max_images_per_row,
        )


def validate_dataset(
    path: Path,
    *,
    expected_format: DatasetFormat | None = None,
    file_type: str | None = None,
    tokenizer: PreTrainedTokenizerBase | None = None,
    max_length: int | None = None,
    max_errors: int = 1000,
    images: ImageCheck | None = None,
    workdir: Path | None = None,
) -> ValidationReport:
    """Read a dataset file once and report its type, format, every bad row, token counts and SHA-256.

    ``format_counts`` counts the rows per detected format (valid or not). ``errors`` is sorted by
    row and capped at ``max_errors``; ``invalid_rows`` is exact. ``file_type`` (jsonl, json,
    parquet) skips detection. Token statistics (only with a
    ``tokenizer``) cover the valid rows of the file's format; ``max_length`` needs a tokenizer.
    Raises NotFound for a missing file, InvalidArgument for bad arguments; problems in the data
    are reported, never raised.

    ``path`` may be an image+text dataset archive (``.zip``, ``.tar``, ``.tar.gz``): it is extracted into a
    temporary folder under ``workdir`` (an unsafe or unreadable archive is an InvalidArgument with reason
    DATASET_ARCHIVE_INVALID) and its data file validated, image paths resolving inside it; ``sha256`` and
    ``size_bytes`` are the archive's. Every image a row refers to is read and decoded as ``images`` says
    (default: remote URLs refused, no model limits); with ``images.processor`` (a vision-language model's) the
    token statistics count each row as that processor encodes it, images included.
    """
    path = Path(path)
    if max_errors < 1:
        raise InvalidArgument.for_field("max_errors", "must be at least 1")
    if max_length is not None and max_length < 1:
        raise InvalidArgument.for_field("max_length", "must be a positive number of tokens")
    if max_length is not None and tokenizer is None and (images is None or images.processor is None):
        raise InvalidArgument.for_field("max_length", "needs a tokenizer to count tokens")
    expected: DatasetFormat | None = None
    if expected_format is not None:
        try:
            expected = DatasetFormat(expected_format)
        except ValueError:
            known = ", ".join(DatasetFormat)
            reason = f"unknown format {expected_format!r} (expected one of {known})"
            raise InvalidArgument.for_field("expected_format", reason) from None
    if not is_archive(path.name):
        return _validate_file(path, file_type, expected, _Tally(tokenizer, max_length, max_errors, images))
    if not path.is_file():
        raise NotFound(f"dataset file not found: {path}", reason="DATASET_FILE_NOT_FOUND")
    try:
        with opened_dataset(path, workdir) as (data, image_dir):
            report = _validate_file(
                data, file_type, expected, _Tally(tokenizer, max_length, max_errors, images, image_dir)
            )
    except ImageError as exc:
        raise InvalidArgument(
            f"{path.name}: {exc}", reason="DATASET_ARCHIVE_INVALID", violations=[FieldViolation("file", str(exc))]
        ) from None
    digest = _Digest()
    with open(path, "rb") as raw:
        digest.consume(raw)
    report.sha256, report.size_bytes = digest.sha256.hexdigest(), digest.size
    return report


def _validate_file(
    path: Path, file_type: str | None, expected: DatasetFormat | None, tally: _Tally
) -> ValidationReport:
    kind = _resolve_file_type(path, file_type)
    digest = _Digest()
    for row_no, value in _rows(path, kind, digest):
        tally.add(row_no, value)
    return tally.report(kind, expected, digest)
