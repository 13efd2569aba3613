"""The shared list module: parsing, errors, and paging that runs in SQL (SQLite and the real PostgreSQL)."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import JSON, Column, DateTime, Integer, MetaData, String, Table, create_engine, event, insert, select
from sqlalchemy.exc import OperationalError
from sqlalchemy.orm import Session

from services.core import listing
from services.core.errors import InvalidArgument
from services.core.listing import Field, Schema, enum_value, int_value, time_value

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
ROWS = 10_000
KINDS = ("base", "adapter", "merged", "quantized")


def make_table(name: str) -> tuple[Table, Schema]:
    meta = MetaData()
    table = Table(
        name, meta,
        Column("name", String(100), primary_key=True),
        Column("kind", String(20), nullable=False),
        Column("size", Integer, nullable=False),
        Column("created", DateTime(timezone=True), nullable=False),
        Column("labels", JSON, nullable=False),
    )
    schema = Schema(
        {
            "name": Field(table.c.name, lambda r: r.name, sortable=True),
            "kind": Field(table.c.kind, lambda r: r.kind, parse=enum_value("MODEL_KIND_", choices=KINDS),
                          ops=listing.EQUALITY),
            "size": Field(table.c.size, lambda r: r.size, parse=int_value, sortable=True),
            "create_time": Field(table.c.created, lambda r: r.created, parse=time_value, sortable=True),
        },
        default_order="create_time",
        name=Field(table.c.name, lambda r: r.name),
        labels=table.c.labels,
        labels_get=lambda r: r.labels,
    )
    return table, schema


@dataclass
class Item:
    name: str
    kind: str
    size: int
    created: datetime
    labels: dict[str, str]


def rows(n: int) -> list[dict]:
    return [
        {"name": f"m/{i:05d}", "kind": KINDS[i % 4], "size": i % 100, "created": T0 + timedelta(seconds=i // 2),
         "labels": {"team": "a" if i % 10 == 0 else "b", **({"gold": "1"} if i % 1000 == 0 else {})}}
        for i in range(n)
    ]


def _engine(url: str):
    engine = create_engine(url)
    try:
        engine.connect().close()
    except OperationalError as e:  # pragma: no cover - PostgreSQL runs as a system service here and in CI
        pytest.fail(f"database {url} unreachable: {e}")
    return engine


@pytest.fixture
def db(db_url):
    """A table of 10,000 rows in SQLite and in the real PostgreSQL (a fresh database of its own)."""
    engine = _engine(db_url)
    table, schema = make_table(f"listing_{uuid.uuid4().hex[:8]}")
    table.metadata.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), rows(ROWS))
    yield engine, table, schema
    table.metadata.drop_all(engine)
    engine.dispose()


def _capture(engine):
    seen: list[str] = []

    def before(conn, cursor, statement, parameters, context, executemany):
        seen.append(statement)

    event.listen(engine, "before_cursor_execute", before)
    return seen, lambda: event.remove(engine, "before_cursor_execute", before)


def test_filter_order_and_pages_run_in_sql_over_10000_rows(db):
    engine, table, schema = db
    seen, stop = _capture(engine)
    visited: list[str] = []
    token, pages = "", 0
    try:
        while True:
            q = listing.parse(schema, filter='kind = MODEL_KIND_MERGED AND labels.team = "a" AND size >= 10',
                              order_by="size desc, name", page_size=50, page_token=token)
            with Session(engine) as s:
                page = listing.sql_page(s, select(table), q, schema)
            assert len(page.items) <= 50
            visited += [r.name for r in page.items]
            pages += 1
            token = page.next_page_token
            if not token:
                break
    finally:
        stop()
    expected = sorted((r for r in rows(ROWS) if r["kind"] == "merged" and r["labels"]["team"] == "a"
                       and r["size"] >= 10), key=lambda r: (-r["size"], r["name"]))
    assert visited == [r["name"] for r in expected]  # every match once, in order
    assert len(expected) > 100 and page.total_size == len(expected) and pages == -(-len(expected) // 50)
    selects = [s for s in seen if s.lstrip().upper().startswith("SELECT") and "count(" not in s.lower()]
    assert len(selects) == pages
    for statement in selects:  # the database filters, orders and limits: Python never sees other rows
        upper = statement.upper()
        assert "WHERE" in upper and "ORDER BY" in upper and "LIMIT" in upper, statement


def test_presence_not_equal_and_time_terms(db):
    engine, table, schema = db
    with Session(engine) as s:
        gold = listing.sql_page(s, select(table), listing.parse(schema, filter="labels.gold:*", page_size=100), schema)
        assert [r.name for r in gold.items] == [f"m/{i:05d}" for i in range(0, ROWS, 1000)]
        late = listing.parse(schema, filter='create_time >= "2026-01-01T01:23:00Z" AND kind != base', page_size=1000)
        page = listing.sql_page(s, select(table), late, schema)
    cutoff = T0 + timedelta(minutes=83)
    expected = [r for r in rows(ROWS) if r["created"] >= cutoff and r["kind"] != "base"]
    assert page.total_size == len(expected) and {r.kind for r in page.items} == {"adapter", "merged", "quantized"}
    # the same instant written with an offset selects the same rows (SQLite compares times as text)
    offset = listing.parse(schema, filter='create_time >= "2026-01-01T06:53:00+05:30" AND kind != base', page_size=1)
    with Session(engine) as s:
        assert listing.sql_page(s, select(table), offset, schema).total_size == len(expected)


def test_unset_values_sort_last_ascending_and_first_descending_like_memory_page(db_url):
    engine = _engine(db_url)
    meta = MetaData()
    table = Table("ended", meta, Column("name", String(20), primary_key=True),
                  Column("end_time", DateTime(timezone=True)), Column("size", Integer))
    schema = Schema({"name": Field(table.c.name, lambda r: r.name, sortable=True),
                     "end_time": Field(table.c.end_time, lambda r: r.end_time, parse=time_value, sortable=True),
                     "size": Field(table.c.size, lambda r: r.size, parse=int_value, sortable=True)},
                    name=Field(table.c.name, lambda r: r.name))
    data = [{"name": f"j{i}", "end_time": None if i % 3 == 0 else T0 + timedelta(minutes=i % 4),
             "size": None if i % 4 == 0 else i % 3} for i in range(12)]
    meta.create_all(engine)
    with engine.begin() as conn:
        conn.execute(insert(table), data)

    @dataclass
    class Row:
        name: str
        end_time: datetime | None
        size: int | None

    items = [Row(**d) for d in data]
    try:
        for order in ("end_time", "end_time desc", "size desc, end_time", "size, end_time desc"):
            names, token = [], ""
            while True:  # pages of 5: the SQL order holds across pages
                q = listing.parse(schema, order_by=order, page_size=5, page_token=token)
                with Session(engine) as s:
                    page = listing.sql_page(s, select(table), q, schema)
                names += [r.name for r in page.items]
                if not (token := page.next_page_token):
                    break
            in_memory = listing.memory_page(items, listing.parse(schema, order_by=order, page_size=100), schema)
            assert names == [i.name for i in in_memory.items], order
        ascending = listing.memory_page(items, listing.parse(schema, order_by="end_time", page_size=100), schema)
        assert [i.end_time for i in ascending.items][-4:] == [None] * 4  # j0, j3, j6, j9 unset: last
    finally:
        engine.dispose()


def test_memory_page_matches_sql_semantics(db):
    engine, table, schema = db
    items = [Item(**r) for r in rows(500)]
    q = listing.parse(schema, filter="kind = merged AND labels.team = b", order_by="size desc", page_size=7)
    mem = listing.memory_page(items, q, schema)
    with Session(engine) as s:
        sql = listing.sql_page(s, select(table).where(table.c.name < "m/00500"), q, schema)
    assert [i.name for i in mem.items] == [r.name for r in sql.items]
    assert mem.total_size == sql.total_size and mem.next_page_token == sql.next_page_token


@pytest.mark.parametrize(("kwargs", "field", "words"), [
    ({"filter": "colour = red"}, "filter", "unknown field 'colour'"),
    ({"filter": "kind = sideways"}, "filter", "expected one of"),
    ({"filter": "kind > base"}, "filter", "does not support '>'"),
    ({"filter": "size = many"}, "filter", "bad value 'many'"),
    ({"filter": "size = 1 OR size = 2"}, "filter", "cannot parse"),
    ({"filter": "name = *"}, "filter", "presence"),
    ({"order_by": "kind"}, "order_by", "cannot sort by 'kind'"),
    ({"order_by": "size upward"}, "order_by", "expected 'field [asc|desc]'"),
    ({"page_size": -1}, "page_size", "must not be negative"),
    ({"page_token": "not-a-token"}, "page_token", "not a token"),
])
def test_bad_requests_name_the_field(kwargs, field, words):
    _, schema = make_table("t")
    with pytest.raises(InvalidArgument) as err:
        listing.parse(schema, **kwargs)
    assert err.value.violations[0].field == field
    assert words in err.value.violations[0].description


def test_page_token_is_bound_to_its_query():
    _, schema = make_table("t")
    items = [Item(**r) for r in rows(30)]
    first = listing.memory_page(items, listing.parse(schema, filter="kind = base", page_size=2), schema)
    assert first.next_page_token
    with pytest.raises(InvalidArgument, match="different"):
        listing.parse(schema, filter="kind = adapter", page_size=2, page_token=first.next_page_token)
    with pytest.raises(InvalidArgument, match="different"):
        listing.parse(schema, filter="kind = base", page_size=2, page_token=first.next_page_token, scope="models/x")
    second = listing.memory_page(
        items, listing.parse(schema, filter="kind = base", page_size=2, page_token=first.next_page_token), schema)
    assert [i.name for i in second.items] == ["m/00008", "m/00012"]


def test_page_size_bounds():
    assert listing.effective_page_size(0) == listing.DEFAULT_PAGE_SIZE == 50
    assert listing.effective_page_size(5000) == listing.MAX_PAGE_SIZE == 1000
    assert listing.effective_page_size(7) == 7
