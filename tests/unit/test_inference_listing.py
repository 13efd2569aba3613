"""ListDeployments through the shared list module: filter, order and pages over the live deployments."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from services.core import listing
from services.core.errors import InvalidArgument
from services.inference.deployments import LIST_SCHEMA, DeploymentRecord, DeploymentView, State

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _view(i: int, state: State, engine: str = "transformers") -> DeploymentView:
    record = DeploymentRecord(name=f"deployments/d{i:02d}", model_version=f"models/m/versions/{i % 2}", engine=engine,
                              create_time=T0 + timedelta(minutes=i), update_time=T0 + timedelta(minutes=i))
    return DeploymentView(record, state, [], None, T0 + timedelta(minutes=30 - i))


VIEWS = [_view(i, State.READY if i % 3 else State.FAILED, "vllm" if i % 4 == 0 else "transformers")
         for i in range(12)]


def _names(page: listing.Page[DeploymentView]) -> list[str]:
    return [v.record.name for v in page.items]


def _list(**request) -> listing.Page[DeploymentView]:
    return listing.memory_page(VIEWS, listing.parse(LIST_SCHEMA, **request), LIST_SCHEMA)


def test_default_order_is_newest_first():
    assert _names(_list()) == [f"deployments/d{i:02d}" for i in reversed(range(12))]


def test_filters_take_the_proto_or_bare_enum_spelling():
    failed = [f"deployments/d{i:02d}" for i in (9, 6, 3, 0)]
    assert _names(_list(filter="state = DEPLOYMENT_STATE_FAILED")) == failed
    assert _names(_list(filter="state = failed")) == failed
    assert _names(_list(filter='engine = ENGINE_VLLM AND state != FAILED')) == ["deployments/d08", "deployments/d04"]
    assert _names(_list(filter='model_version = "models/m/versions/1" AND engine = transformers',
                        order_by="name")) == [f"deployments/d{i:02d}" for i in (1, 3, 5, 7, 9, 11)]


def test_order_by_update_time_and_pages_visit_each_once():
    seen, token = [], ""
    while True:
        page = _list(order_by="update_time", page_size=5, page_token=token)
        seen += _names(page)
        assert page.total_size == 12
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"deployments/d{i:02d}" for i in reversed(range(12))]  # oldest update = highest i


@pytest.mark.parametrize("request_, field", [
    ({"filter": "colour = red"}, "filter"),
    ({"filter": "state = SLEEPING"}, "filter"),
    ({"filter": "create_time > yesterday"}, "filter"),
    ({"order_by": "engine"}, "order_by"),
    ({"page_size": -1}, "page_size"),
    ({"page_token": "not-a-token"}, "page_token"),
])
def test_bad_requests_name_the_field(request_, field):
    with pytest.raises(InvalidArgument) as info:
        _list(**request_)
    assert [v.field for v in info.value.violations] == [field]


def test_a_token_is_bound_to_its_filter():
    token = _list(page_size=2, filter="state = READY").next_page_token
    assert token
    with pytest.raises(InvalidArgument) as info:
        _list(page_size=2, filter="state = FAILED", page_token=token)
    assert info.value.violations[0].field == "page_token"
