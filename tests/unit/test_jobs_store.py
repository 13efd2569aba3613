"""JobStore on a real SQLite file and a real PostgreSQL database, without child processes."""

from __future__ import annotations

import time

import pytest

from services.core import listing
from services.core.db import Database
from services.core.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    error_dict,
    error_to_domain,
)
from services.core.jobs import JOB_ATTEMPTS_EXHAUSTED, EventType, JobState, JobStore, NewEvent
from services.core.jobs.store import JOB_SCHEMA


@pytest.fixture
def store(db_url):
    db = Database(db_url)  # a SQLite file, and a PostgreSQL database of its own (tests/conftest.py)
    yield JobStore(db)
    db.dispose()


def test_create_validates_fields_and_refuses_duplicates(store):
    job = store.create("ok", {"a": 1}, name="trainingJobs/x1", labels={"team": "a"})
    assert (job.name, job.state, job.attempt, job.max_attempts, job.labels) == (
        "trainingJobs/x1", JobState.QUEUED, 1, 3, {"team": "a"})
    assert store.create("ok", {}).name.startswith("jobs/")
    with pytest.raises(AlreadyExists):
        store.create("ok", {}, name="trainingJobs/x1")
    with pytest.raises(InvalidArgument) as err:
        store.create("ok", {}, name="../etc")
    assert err.value.violations[0].field == "name"
    with pytest.raises(InvalidArgument, match="max_attempts"):
        store.create("ok", {}, max_attempts=0)
    with pytest.raises(InvalidArgument, match="spec: must be JSON"):
        store.create("ok", {"x": object()})
    with pytest.raises(NotFound):
        store.get("trainingJobs/missing")


def test_list_filters_orders_and_pages(store):
    names = [store.create("a" if i % 2 else "b", {}, name=f"jobs/j{i:02d}").name for i in range(7)]
    store.request_cancel("jobs/j00")

    def page(**kw):
        token = kw.pop("page_token", "")
        kinds = kw.pop("kinds", ())
        return store.list(listing.parse(JOB_SCHEMA, page_token=token, **kw), kinds=kinds)

    p1 = page(order_by="name", page_size=3)
    assert [j.name for j in p1.items] == names[:3] and p1.next_page_token and p1.total_size == 7
    p2 = page(order_by="name", page_size=3, page_token=p1.next_page_token)
    p3 = page(order_by="name", page_size=3, page_token=p2.next_page_token)
    assert [j.name for j in p2.items + p3.items] == names[3:] and p3.next_page_token == ""
    assert [j.name for j in page(kinds=["b"], filter="state = JOB_STATE_QUEUED", order_by="name desc").items] == [
        "jobs/j06", "jobs/j04", "jobs/j02"]
    assert [j.name for j in page(filter="state = cancelled").items] == ["jobs/j00"]
    with pytest.raises(InvalidArgument, match="page_token"):
        page(order_by="name desc", page_size=3, page_token=p1.next_page_token)
    with pytest.raises(InvalidArgument, match="page_size"):
        page(page_size=-1)
    with pytest.raises(InvalidArgument, match="order_by"):
        page(order_by="state")
    with pytest.raises(InvalidArgument, match="filter"):
        page(filter="state = SLEEPING")


def test_claim_takes_oldest_queued_job_of_known_kinds_once(store):
    first = store.create("a", {})
    store.create("other", {})
    store.create("a", {})
    claimed = store.claim("w1", ["a"])
    assert claimed.name == first.name and claimed.state == JobState.RUNNING and claimed.worker == "w1"
    assert store.claim("w2", ["a"]).name != first.name
    assert store.claim("w2", ["a"]) is None
    assert store.claim("w2", []) is None


def test_only_the_owning_worker_may_write_a_running_job(store):
    store.create("a", {})
    job = store.claim("w1", ["a"])
    with pytest.raises(FailedPrecondition) as err:
        store.finish(job.name, "w2", JobState.SUCCEEDED)
    assert err.value.reason == "JOB_NOT_OWNED"
    with pytest.raises(FailedPrecondition):
        store.sync(job.name, "w2", [NewEvent(EventType.LOG, "x")])
    assert store.sync(job.name, "w1", [NewEvent(EventType.LOG, "x")], progress={"fraction": 0.5}) is False
    store.request_cancel(job.name)
    assert store.heartbeat(job.name, "w1") is True
    done = store.finish(job.name, "w1", JobState.CANCELLED, outputs={"k": 1})
    assert (done.state, done.outputs, done.progress) == (JobState.CANCELLED, {"k": 1}, {"fraction": 0.5})
    with pytest.raises(FailedPrecondition):
        store.finish(job.name, "w1", JobState.SUCCEEDED)


def test_events_get_consecutive_sequence_numbers(store):
    job = store.create("a", {})
    stored = store.append_events(job.name, [NewEvent(EventType.LOG, f"m{i}") for i in range(3)])
    assert [e.seq for e in stored] == [2, 3, 4]  # 1 is the "queued" state event
    assert [e.message for e in store.events(job.name, after_seq=2)] == ["m1", "m2"]
    assert [e.message for e in store.events(job.name, after_seq=1, limit=1)] == ["m0"]
    with pytest.raises(NotFound):
        store.append_events("jobs/none", [NewEvent(EventType.LOG, "x")])


def test_requeue_stale_requeues_then_fails_when_attempts_are_exhausted(store):
    job = store.create("a", {}, max_attempts=2)
    store.claim("dead", ["a"])
    assert store.requeue_stale(60) == []  # heartbeat is fresh
    time.sleep(0.05)
    assert store.requeue_stale(0.01) == [job.name]
    again = store.get(job.name)
    assert (again.state, again.attempt, again.worker) == (JobState.QUEUED, 2, None)
    store.claim("dead-too", ["a"])
    time.sleep(0.05)
    assert store.requeue_stale(0.01) == [job.name]
    failed = store.get(job.name)
    assert failed.state == JobState.FAILED and failed.error["reason"] == JOB_ATTEMPTS_EXHAUSTED
    assert "no heartbeat from worker dead-too" in failed.error["message"]


def test_lost_attempt_of_a_job_being_cancelled_ends_cancelled(store):
    job = store.create("a", {})
    store.claim("w1", ["a"])
    store.request_cancel(job.name)
    assert store.lose_attempt(job.name, "w1", "child killed").state == JobState.CANCELLED


def test_stored_error_round_trips_to_the_typed_error():
    original = InvalidArgument.for_field("spec.lr", "must be > 0")
    back = error_to_domain(error_dict(original))
    assert type(back) is InvalidArgument and back.reason == "INVALID_ARGUMENT"
    assert [(v.field, v.description) for v in back.violations] == [("spec.lr", "must be > 0")]
