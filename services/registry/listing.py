"""List helpers shared by every List RPC: AIP-160-style filters, order_by and opaque page tokens.

Filters are a conjunction of terms joined by ``AND``: ``field = "value"``, ``field != value``,
``labels.KEY:*`` (presence) and ``field:value`` (same as ``=``). Values compare as strings;
enum fields accept the bare value or the proto spelling (``ADAPTER``, ``MODEL_KIND_ADAPTER``).
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from services.core.errors import InvalidArgument

T = TypeVar("T")

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000

_TERM_RE = re.compile(r'^\s*([A-Za-z_][A-Za-z0-9_.\-/]*)\s*(!=|=|:)\s*(?:"((?:[^"\\]|\\.)*)"|(\S+))\s*$')


@dataclass(frozen=True)
class Term:
    field: str
    op: str  # "=", "!=", ":" (":*" = presence)
    value: str


@dataclass(frozen=True)
class Fields:
    """How a resource type is filtered and sorted."""

    getters: dict[str, Callable[[Any], Any]]  # filterable / sortable fields (labels.* handled apart)
    enum_prefixes: dict[str, str]  # field -> proto enum prefix, e.g. kind -> MODEL_KIND_
    sortable: frozenset[str]
    default_order: str


def parse_filter(text: str, fields: Fields) -> list[Term]:
    """Parse ``text``; InvalidArgument names the ``filter`` field and the bad term."""
    text = (text or "").strip()
    if not text:
        return []
    terms = []
    for raw in re.split(r"\s+AND\s+", text):
        m = _TERM_RE.match(raw)
        if not m:
            raise InvalidArgument.for_field("filter", f"cannot parse term {raw.strip()!r}; expected field = \"value\"")
        field, op, quoted, bare = m.groups()
        value = quoted.replace('\\"', '"') if quoted is not None else bare
        if not (field.startswith("labels.") and len(field) > 7) and field not in fields.getters:
            known = ", ".join(sorted([*fields.getters, "labels.KEY"]))
            raise InvalidArgument.for_field("filter", f"unknown field {field!r}; known fields: {known}")
        if value == "*" and op != ":":
            raise InvalidArgument.for_field("filter", f"'*' only works with ':' (presence), in {raw.strip()!r}")
        terms.append(Term(field, op, value))
    return terms


def _value_of(item: Any, field: str, fields: Fields) -> Any:
    if field.startswith("labels."):
        return item.labels.get(field[7:])
    return fields.getters[field](item)


def _normalise(field: str, value: str, fields: Fields) -> str:
    prefix = fields.enum_prefixes.get(field)
    if prefix is None:
        return value
    value = value.upper()
    return value[len(prefix):].lower() if value.startswith(prefix) else value.lower()


def matches(item: Any, terms: Sequence[Term], fields: Fields) -> bool:
    for t in terms:
        actual = _value_of(item, t.field, fields)
        if t.op == ":" and t.value == "*":
            ok = actual not in (None, "")
        else:
            want = _normalise(t.field, t.value, fields)
            ok = (str(actual) if actual is not None else None) == want
            ok = (not ok) if t.op == "!=" else ok
        if not ok:
            return False
    return True


def sort_items(items: list[T], order_by: str, fields: Fields) -> list[T]:
    """Sort by ``order_by`` (``a desc, b``); InvalidArgument names ``order_by``; name breaks ties."""
    spec = (order_by or fields.default_order).strip()
    keys: list[tuple[str, bool]] = []
    for part in spec.split(","):
        words = part.split()
        if not words or len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
            raise InvalidArgument.for_field("order_by", f"cannot parse {part.strip()!r}; expected 'field [asc|desc]'")
        if words[0] not in fields.sortable:
            raise InvalidArgument.for_field(
                "order_by", f"cannot sort by {words[0]!r}; sortable fields: {', '.join(sorted(fields.sortable))}"
            )
        keys.append((words[0], len(words) == 2 and words[1].lower() == "desc"))
    result = sorted(items, key=lambda i: i.name)
    for field, desc in reversed(keys):
        result.sort(key=lambda i, f=field: fields.getters[f](i), reverse=desc)
    return result


def _query_hash(parts: Sequence[str]) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:16]


def paginate(
    items: list[T], page_size: int, page_token: str, query: Sequence[str]
) -> tuple[list[T], str, int]:
    """One page of ``items``: (page, next_page_token, total). ``query`` identifies the request
    (parent, filter, order_by) so a token cannot be replayed against another query."""
    if page_size < 0:
        raise InvalidArgument.for_field("page_size", f"must not be negative, got {page_size}")
    size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    qh = _query_hash(query)
    offset = 0
    if page_token:
        try:
            doc = json.loads(base64.urlsafe_b64decode(page_token.encode() + b"=" * (-len(page_token) % 4)))
            offset, token_q = int(doc["o"]), str(doc["q"])
        except (ValueError, KeyError, TypeError):
            raise InvalidArgument.for_field("page_token", "is not a token returned by this list method") from None
        if token_q != qh or offset < 0:
            raise InvalidArgument.for_field("page_token", "was issued for a different parent, filter or order_by")
    page = items[offset:offset + size]
    end = offset + len(page)
    token = ""
    if end < len(items):
        token = base64.urlsafe_b64encode(json.dumps({"o": end, "q": qh}).encode()).decode().rstrip("=")
    return page, token, len(items)


def list_page(
    items: list[T], *, fields: Fields, filter: str, order_by: str, page_size: int, page_token: str, scope: str = ""
) -> tuple[list[T], str, int]:
    """Filter, sort and page ``items`` in one call."""
    if page_size < 0:
        raise InvalidArgument.for_field("page_size", f"must not be negative, got {page_size}")
    terms = parse_filter(filter, fields)
    selected = sort_items([i for i in items if matches(i, terms, fields)], order_by, fields)
    return paginate(selected, page_size, page_token, (scope, filter or "", order_by or ""))
