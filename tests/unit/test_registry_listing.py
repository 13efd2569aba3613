"""Filters, ordering and page tokens of the registry's List methods."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest

from services.core.errors import InvalidArgument
from services.registry import listing
from services.registry.names import parse_version


@dataclass
class Item:
    name: str
    kind: str
    size: int
    labels: dict[str, str] = field(default_factory=dict)


FIELDS = listing.Fields(
    getters={"name": lambda i: i.name, "kind": lambda i: i.kind, "size": lambda i: i.size},
    enum_prefixes={"kind": "MODEL_KIND_"}, sortable=frozenset({"name", "size"}), default_order="name",
)
ITEMS = [Item(f"x{i:02d}", "adapter" if i % 3 == 0 else "base", i % 5, {"team": "a"} if i < 10 else {}) for i in range(30)]


def test_pages_cover_every_item_once_and_tokens_are_bound_to_the_query():
    seen, token = [], ""
    while True:
        page, token, total = listing.list_page(ITEMS, fields=FIELDS, filter="", order_by="size desc", page_size=7,
                                               page_token=token)
        seen += page
        if not token:
            break
    assert total == 30 and sorted(i.name for i in seen) == sorted(i.name for i in ITEMS)
    assert [i.size for i in seen] == sorted((i.size for i in ITEMS), reverse=True)
    _, token, _ = listing.list_page(ITEMS, fields=FIELDS, filter="", order_by="", page_size=7, page_token="")
    with pytest.raises(InvalidArgument, match="page_token"):
        listing.list_page(ITEMS, fields=FIELDS, filter="kind = base", order_by="", page_size=7, page_token=token)


@pytest.mark.parametrize("text,expected", [
    ("kind = ADAPTER", 10), ("kind = MODEL_KIND_BASE", 20), ('kind != "adapter"', 20),
    ("labels.team:*", 10), ('labels.team = "a" AND kind = base', 6),
])
def test_filters(text, expected):
    assert listing.list_page(ITEMS, fields=FIELDS, filter=text, order_by="", page_size=100, page_token="")[2] == expected


@pytest.mark.parametrize("kwargs,field_name", [
    ({"filter": "colour = red"}, "filter"), ({"filter": "kind ="}, "filter"), ({"order_by": "kind"}, "order_by"),
    ({"order_by": "name sideways"}, "order_by"), ({"page_size": -1}, "page_size"), ({"page_token": "%%%"}, "page_token"),
])
def test_bad_list_arguments_name_the_field(kwargs, field_name):
    args = {"filter": "", "order_by": "", "page_size": 0, "page_token": ""} | kwargs
    with pytest.raises(InvalidArgument) as info:
        listing.list_page(ITEMS, fields=FIELDS, **args)
    assert info.value.violations[0].field == field_name


def test_version_names_are_validated():
    assert str(parse_version("models/a-1/versions/v2", "models")) == "models/a-1/versions/v2"
    for bad in ("models/A/versions/v1", "models/a/v1", "datasets/a/versions/v1", "models/a/versions/-x"):
        with pytest.raises(InvalidArgument):
            parse_version(bad, "models")
