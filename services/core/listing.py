"""The one implementation of List RPCs: filters, order_by, page sizes and page tokens.

Every List RPC of every service goes through here, so they all accept the same syntax and report the
same errors (``InvalidArgument`` naming ``filter``, ``order_by``, ``page_size`` or ``page_token``).

Filter (AIP-160 subset): terms joined by ``AND``; each term is ``field OP value`` with OP one of
``=``, ``!=``, ``<``, ``<=``, ``>``, ``>=`` or ``:`` (``:`` is ``=``, and ``field:*`` tests presence).
Values are bare words or double-quoted strings. ``labels.KEY`` addresses one label. Enum fields take
the bare value or the proto spelling (``ADAPTER`` or ``MODEL_KIND_ADAPTER``).

order_by: ``field [asc|desc], field [asc|desc]``; the resource name always breaks ties; an unset value
sorts last in ascending order and first in descending order.

Page tokens are opaque: an offset bound to a hash of the query (scope, filter, order_by), so a token
cannot be replayed against another query.

Where the rows live in SQL, ``sql_page`` turns the parsed query into WHERE / ORDER BY / LIMIT /
OFFSET and one COUNT: nothing is filtered or sorted in Python. ``memory_page`` does the same over
a list for resources that live in memory.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import operator
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Generic, TypeVar

from sqlalchemy import Select, func, select
from sqlalchemy.orm import Session
from sqlalchemy.sql.elements import ColumnElement

from .errors import InvalidArgument

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

_OPS: dict[str, Callable[[Any, Any], Any]] = {
    "=": operator.eq,
    ":": operator.eq,
    "!=": operator.ne,
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
EQUALITY = frozenset({"=", ":", "!="})  # the operators of fields that have no order (enums, names)
_TERM_RE = re.compile(r'^\s*([A-Za-z_][A-Za-z0-9_.\-/]*)\s*(!=|<=|>=|=|<|>|:)\s*(?:"((?:[^"\\]|\\.)*)"|(\S+))\s*$')
_AND_RE = re.compile(r"\s+AND\s+")


# ---------------------------------------------------------------------------------------------- values


def text_value(value: str) -> str:
    return value


def int_value(value: str) -> int:
    return int(value)


def float_value(value: str) -> float:
    return float(value)


def bool_value(value: str) -> bool:
    low = value.lower()
    if low not in ("true", "false"):
        raise ValueError("expected true or false")
    return low == "true"


def time_value(value: str) -> datetime:
    """An RFC 3339 time (``2026-01-02T03:04:05Z``), in UTC; a time without zone is UTC. (UTC, because SQLite
    compares times as text: ``03:04+05:30`` must reach it as ``21:34`` of the day before.)"""
    parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return parsed.astimezone(timezone.utc) if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)


def enum_value(prefix: str, *, upper: bool = False, choices: Sequence[str] = ()) -> Callable[[str], str]:
    """Accept ``VALUE``, ``value`` or ``PREFIX_VALUE``; give the stored spelling (lower, or upper)."""

    def parse(value: str) -> str:
        v = value.upper()
        v = v.removeprefix(prefix) if prefix else v
        stored = v if upper else v.lower()
        if choices and stored not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}")
        return stored

    return parse


# ---------------------------------------------------------------------------------------------- schema


@dataclass(frozen=True)
class Field:
    """One filterable (and maybe sortable) field of a resource.

    ``column`` is the SQL expression (for ``sql_page``); ``get`` reads the value from an item (for
    ``memory_page``); ``parse`` turns the filter's text into a comparable value (raises ValueError).
    """

    column: Any = None
    get: Callable[[Any], Any] | None = None
    parse: Callable[[str], Any] = text_value
    sortable: bool = False
    ops: frozenset[str] = frozenset(_OPS)


@dataclass(frozen=True)
class Schema:
    """How one resource type is listed."""

    fields: dict[str, Field]
    default_order: str = "name"
    name: Field = field(default_factory=Field)  # tie-breaker (its column / getter)
    labels: Any = None  # SQL JSON column of the labels (enables ``labels.KEY`` terms)
    labels_get: Callable[[Any], dict[str, str]] | None = None  # the same for memory_page

    @property
    def sortable(self) -> list[str]:
        return sorted(k for k, f in self.fields.items() if f.sortable)


@dataclass(frozen=True)
class Term:
    field: str
    op: str
    value: Any  # parsed; None for a presence test
    label: str | None = None  # the KEY of ``labels.KEY``

    @property
    def presence(self) -> bool:
        return self.op == ":" and self.value is None


@dataclass(frozen=True)
class Query:
    """A parsed List request."""

    terms: tuple[Term, ...]
    order: tuple[tuple[str, bool], ...]  # (field, descending)
    size: int
    offset: int
    fingerprint: str


@dataclass
class Page(Generic[T]):
    items: list[T]
    next_page_token: str
    total_size: int


# ---------------------------------------------------------------------------------------------- parsing


def effective_page_size(value: int) -> int:
    """The effective page size: 0 means the default, at most MAX_PAGE_SIZE; negative is refused."""
    if value < 0:
        raise InvalidArgument.for_field("page_size", f"must not be negative, got {value}")
    return min(value or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


def parse_filter(text: str, schema: Schema) -> tuple[Term, ...]:
    text = (text or "").strip()
    if not text:
        return ()
    terms = []
    for raw in _AND_RE.split(text):
        m = _TERM_RE.match(raw)
        if not m:
            raise InvalidArgument.for_field(
                "filter", f'cannot parse term {raw.strip()!r}; expected field = "value" terms joined by AND'
            )
        name, op, quoted, bare = m.groups()
        value = quoted.replace('\\"', '"') if quoted is not None else bare
        if name.startswith("labels.") and len(name) > 7 and (schema.labels is not None or schema.labels_get):
            if op not in ("=", "!=", ":"):
                raise InvalidArgument.for_field("filter", f"labels compare with =, != or : only, in {raw.strip()!r}")
            terms.append(Term(name, op, None if (op == ":" and value == "*") else value, label=name[7:]))
            continue
        spec = schema.fields.get(name)
        if spec is None:
            known = sorted(schema.fields) + (["labels.KEY"] if schema.labels is not None or schema.labels_get else [])
            raise InvalidArgument.for_field("filter", f"unknown field {name!r}; known fields: {', '.join(known)}")
        if op == ":" and value == "*":
            terms.append(Term(name, op, None))
            continue
        if value == "*":
            raise InvalidArgument.for_field("filter", f"'*' only works with ':' (presence), in {raw.strip()!r}")
        if op not in spec.ops:
            raise InvalidArgument.for_field(
                "filter", f"{name!r} does not support {op!r}; use {', '.join(sorted(spec.ops))}"
            )
        try:
            parsed = spec.parse(value)
        except ValueError as e:
            raise InvalidArgument.for_field("filter", f"bad value {value!r} for {name!r}: {e}") from None
        terms.append(Term(name, op, parsed))
    return tuple(terms)


def parse_order_by(text: str, schema: Schema) -> tuple[tuple[str, bool], ...]:
    spec = (text or "").strip() or schema.default_order
    keys: list[tuple[str, bool]] = []
    for part in spec.split(","):
        words = part.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
            raise InvalidArgument.for_field("order_by", f"cannot parse {part.strip()!r}; expected 'field [asc|desc]'")
        name = words[0]
        if name not in schema.fields or not schema.fields[name].sortable:
            raise InvalidArgument.for_field(
                "order_by", f"cannot sort by {name!r}; sortable fields: {', '.join(schema.sortable)}"
            )
        keys.append((name, len(words) == 2 and words[1].lower() == "desc"))
    return tuple(keys)


def encode_token(offset: int, fingerprint: str) -> str:
    raw = json.dumps({"o": offset, "q": fingerprint}, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_token(token: str, fingerprint: str) -> int:
    """The offset ``token`` stands for (0 for no token)."""
    if not token:
        return 0
    try:
        doc = json.loads(base64.urlsafe_b64decode(token.encode() + b"=" * (-len(token) % 4)))
        offset, issued_for = int(doc["o"]), str(doc["q"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgument.for_field("page_token", "is not a token returned by this list method") from None
    if issued_for != fingerprint or offset < 0:
        raise InvalidArgument.for_field("page_token", "was issued for a different parent, filter or order_by")
    return offset


def parse(
    schema: Schema, *, filter: str = "", order_by: str = "", page_size: int = 0, page_token: str = "", scope: str = ""
) -> Query:
    """Check and parse a List request. ``scope`` (the parent, or anything else that narrows the list
    outside the filter) is part of what a page token is bound to."""
    size = effective_page_size(page_size)
    terms = parse_filter(filter, schema)
    order = parse_order_by(order_by, schema)
    fingerprint = hashlib.sha256("\x1f".join((scope, filter or "", order_by or "")).encode()).hexdigest()[:16]
    return Query(terms, order, size, decode_token(page_token, fingerprint), fingerprint)


# ---------------------------------------------------------------------------------------------- SQL


def _label_expr(schema: Schema, key: str) -> ColumnElement:
    return schema.labels[key].as_string()


def where_clauses(query: Query, schema: Schema) -> list[ColumnElement]:
    """The SQL conditions of the query's filter terms."""
    clauses: list[ColumnElement] = []
    for t in query.terms:
        if t.label is not None:
            col = _label_expr(schema, t.label)
            if t.presence:
                clauses.append(col.is_not(None) & (col != ""))
            elif t.op == "!=":
                clauses.append(col.is_(None) | (col != t.value))
            else:
                clauses.append(col == t.value)
            continue
        col = schema.fields[t.field].column
        if col is None:
            raise InvalidArgument.for_field("filter", f"{t.field!r} cannot be filtered here")
        if t.presence:
            clauses.append(col.is_not(None) & (col != ""))
        elif t.op == "!=":
            clauses.append(col.is_(None) | (col != t.value))
        else:
            clauses.append(_OPS[t.op](col, t.value))
    return clauses


def order_clauses(query: Query, schema: Schema) -> list[ColumnElement]:
    """ORDER BY of the query. An unset (NULL) value sorts after every value in ascending order and before
    them in descending order, on every backend (PostgreSQL's default; SQLite's is the opposite) and in
    ``memory_page``."""
    out = []
    for name, desc in query.order:
        col = schema.fields[name].column
        out.append(col.desc().nulls_first() if desc else col.asc().nulls_last())
    if schema.name.column is not None:
        out.append(schema.name.column.asc())
    return out


def sql_page(
    session: Session, stmt: Select, query: Query, schema: Schema, convert: Callable[[Any], T] = lambda row: row
) -> Page[T]:
    """Run ``stmt`` (a SELECT of the resource's rows, already narrowed to its scope) with the query's
    filter, order and page in SQL; ``convert`` maps each result row to the item returned.

    The statement may select ORM entities (``select(Row)``: rows are the entities) or columns.
    """
    filtered = stmt.where(*where_clauses(query, schema))
    total = session.execute(select(func.count()).select_from(filtered.order_by(None).subquery())).scalar_one()
    paged = filtered.order_by(*order_clauses(query, schema)).offset(query.offset).limit(query.size)
    result = session.execute(paged)
    rows = list(result.scalars()) if _selects_one_entity(stmt) else list(result.all())
    end = query.offset + len(rows)
    token = encode_token(end, query.fingerprint) if end < total else ""
    return Page([convert(r) for r in rows], token, int(total))


def _selects_one_entity(stmt: Select) -> bool:
    descs = stmt.column_descriptions
    return len(descs) == 1 and descs[0].get("entity") is not None and descs[0].get("expr") is descs[0].get("entity")


# ---------------------------------------------------------------------------------------------- memory


def _matches(item: Any, query: Query, schema: Schema) -> bool:
    for t in query.terms:
        if t.label is not None:
            labels = schema.labels_get(item) if schema.labels_get else {}
            actual = (labels or {}).get(t.label)
        else:
            getter = schema.fields[t.field].get
            if getter is None:
                raise InvalidArgument.for_field("filter", f"{t.field!r} cannot be filtered here")
            actual = getter(item)
        if t.presence:
            ok = actual not in (None, "")
        elif t.op == "!=":
            ok = actual != t.value
        elif actual is None:
            ok = False
        else:
            try:
                ok = bool(_OPS[t.op](actual, t.value))
            except TypeError:
                raise InvalidArgument.for_field("filter", f"{t.field!r} cannot be compared with {t.op!r}") from None
        if not ok:
            return False
    return True


def _sort_key(getter: Callable[[Any], Any]) -> Callable[[Any], tuple[bool, Any]]:
    return lambda item: (getter(item) is None, getter(item))


def memory_page(items: Sequence[T], query: Query, schema: Schema) -> Page[T]:
    """Filter, sort and page items held in memory, with the same semantics as ``sql_page``."""
    selected = [i for i in items if _matches(i, query, schema)]
    if schema.name.get is not None:
        name_get = schema.name.get
        selected.sort(key=lambda i: name_get(i))
    for name, desc in reversed(query.order):
        getter = schema.fields[name].get
        if getter is None:
            raise InvalidArgument.for_field("order_by", f"cannot sort by {name!r} here")
        selected.sort(key=_sort_key(getter), reverse=desc)
    page = selected[query.offset : query.offset + query.size]
    end = query.offset + len(page)
    token = encode_token(end, query.fingerprint) if end < len(selected) else ""
    return Page(list(page), token, len(selected))
