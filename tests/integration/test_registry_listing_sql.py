"""The registry's List methods filter, order and page in SQL (SQLite and the real PostgreSQL): over
10,000 rows, every statement has its WHERE and LIMIT, no page loads more rows than its size, and the
pages visit every matching row exactly once."""

from __future__ import annotations

from datetime import timedelta

import pytest
from sqlalchemy import event, insert

from services.core.artifacts import S3ArtifactStore
from services.core.db import Database, utcnow
from services.core.jobs import JobStore
from services.core.jobs.records import empty_progress
from services.core.jobs.store import jobs as jobs_table
from services.registry.dataset_store import Datasets
from services.registry.domain import Registry
from services.registry.imports import KIND, Imports
from services.registry.settings import RegistrySettings
from services.registry.tables import COMPONENT, MIGRATIONS, DatasetRow, DatasetVersionRow, ModelRow, VersionRow

N = 10_000
MODELS = 10


@pytest.fixture
def filled(db_url, tmp_path, s3_settings):
    """10,000 model versions over 10 models, 10,000 dataset versions, 10,000 import jobs, in a fresh SQLite file
    and in a fresh PostgreSQL database (``db_url``, tests/conftest.py)."""
    db = Database(db_url)
    db.migrate(COMPONENT, MIGRATIONS)
    store = JobStore(db)
    settings = RegistrySettings(data_dir=tmp_path / "data", s3=s3_settings)
    registry = Registry(db, S3ArtifactStore(s3_settings), settings)
    t0 = utcnow()
    kinds = ["base", "adapter", "merged", "quantized"]
    with db.engine.begin() as conn:
        conn.execute(insert(ModelRow), [{"name": f"models/m{m}", "description": "", "labels": {}, "next_version": 1,
                                         "create_time": t0, "update_time": t0} for m in range(MODELS)])
        conn.execute(insert(VersionRow), [{
            "name": f"models/m{i % MODELS}/versions/v{i:05d}", "model": f"models/m{i % MODELS}", "kind": kinds[i % 4],
            "format": "safetensors", "state": "ready", "description": "", "artifact_prefix": f"p/{i}", "files": [],
            "meta": {"parameter_count": i}, "base_model_version": "", "dataset_versions": [], "job": "",
            "parameters": {}, "source_uri": "", "deployed_by": [], "parameter_count": i, "total_size_bytes": 10 * i,
            "labels": {"team": "a" if i % 10 == 0 else "b"}, "create_time": t0 + timedelta(seconds=i),
            "update_time": t0} for i in range(N)])
        conn.execute(insert(DatasetRow), [{"name": "datasets/d", "description": "", "labels": {}, "next_version": 1,
                                           "create_time": t0}])
        conn.execute(insert(DatasetVersionRow), [{
            "name": f"datasets/d/versions/v{i:05d}", "dataset": "datasets/d", "filename": "t.jsonl",
            "sha256": f"{i:064x}", "size_bytes": i, "format": "messages" if i % 2 else "prompt_completion",
            "row_count": i, "invalid_row_count": 0, "description": "", "labels": {}, "artifact_key": f"d/{i}",
            "create_time": t0 + timedelta(seconds=i)} for i in range(N)])
        conn.execute(insert(jobs_table), [{
            "name": f"imports/{i:032x}", "kind": KIND, "state": "FAILED" if i % 5 == 0 else "SUCCEEDED",
            "spec": {"source_uri": f"s3://b/{i}", "model_version": f"models/m{i % MODELS}/versions/v{i:05d}",
                     "artifact_prefix": f"p/{i}", "created_model": False},
            "attempt": 1, "max_attempts": 3, "created_at": t0 + timedelta(seconds=i), "progress": empty_progress(),
            "outputs": {}, "cancel_requested": False, "labels": {}, "last_seq": 0} for i in range(N)])
    yield db, registry, Datasets(registry), Imports(registry, store)
    db.dispose()


class Recorder:
    """Statements sent to the database and ORM rows loaded, while active."""

    def __init__(self, db: Database) -> None:
        self.db = db
        self.statements: list[str] = []
        self.loaded = 0

    def _statement(self, conn, cursor, statement, parameters, context, executemany) -> None:
        self.statements.append(" ".join(statement.split()).upper())

    def _load(self, target, context) -> None:
        self.loaded += 1

    def __enter__(self) -> Recorder:
        event.listen(self.db.engine, "before_cursor_execute", self._statement)
        for cls in (VersionRow, ModelRow, DatasetRow, DatasetVersionRow):
            event.listen(cls, "load", self._load)
        return self

    def __exit__(self, *exc) -> None:
        event.remove(self.db.engine, "before_cursor_execute", self._statement)
        for cls in (VersionRow, ModelRow, DatasetRow, DatasetVersionRow):
            event.remove(cls, "load", self._load)

    def page_select(self) -> str:
        """The one statement that reads a page (the others: the parent check and the COUNT)."""
        selects = [s for s in self.statements if s.startswith("SELECT") and " OFFSET " in s]
        assert len(selects) == 1, self.statements
        return selects[0]


def _pages(db, call, page_size: int) -> tuple[list, int]:
    """Page through ``call(token)``; assert each page ran in SQL; (every item, total_size)."""
    items, token, total = [], "", None
    while True:
        with Recorder(db) as rec:
            page = call(token)
        select_sql = rec.page_select()
        assert " WHERE " in select_sql and " LIMIT " in select_sql and " ORDER BY " in select_sql, select_sql
        assert rec.loaded <= page_size + 1 and len(page.items) <= page_size  # + the parent's row
        scores = [q for q in rec.statements if "REGISTRY_VERSION_SCORES" in q.upper()]
        assert len(scores) <= 1, scores  # the page's evaluation scores: one query for the page, never one per row
        # (the parent check,) the COUNT, the page (and the scores of its versions)
        assert len(rec.statements) - len(scores) <= 3, rec.statements
        total = page.total_size if total is None else total
        assert page.total_size == total
        items += page.items
        token = page.next_page_token
        if not token:
            return items, total


def test_list_model_versions_filters_orders_and_pages_in_sql(filled):
    db, registry, _, _ = filled
    expected = [i for i in range(N) if i % 4 == 1 and i % 10 == 0 and i >= 100]  # adapters of team a
    items, total = _pages(db, lambda token: registry.list_versions(
        "models/-", filter='kind = MODEL_KIND_ADAPTER AND labels.team = "a" AND parameter_count >= 100',
        order_by="parameter_count desc", page_size=40, page_token=token), 40)
    assert total == len(expected) == len(items)
    assert [v.parameter_count for v in items] == sorted(expected, reverse=True)
    assert len({v.name for v in items}) == len(items)

    one_model, total = _pages(db, lambda token: registry.list_versions(
        "models/m3", filter="total_size_bytes < 2000", order_by="name", page_size=7, page_token=token), 7)
    assert [v.name for v in one_model] == [f"models/m3/versions/v{i:05d}" for i in range(3, 200, MODELS)]


def test_list_models_counts_versions_in_sql(filled):
    db, registry, _, _ = filled
    items, total = _pages(db, lambda token: registry.list_models(
        filter="version_count >= 1000", order_by="version_count desc, name desc", page_size=3, page_token=token), 3)
    assert total == MODELS and [m.name for m in items] == [f"models/m{m}" for m in reversed(range(MODELS))]
    assert {m.version_count for m in items} == {N // MODELS}


def test_list_dataset_versions_and_datasets_page_in_sql(filled):
    db, _, datasets, _ = filled
    items, total = _pages(db, lambda token: datasets.list_versions(
        "datasets/-", filter="format = messages AND size_bytes > 9000", order_by="size_bytes desc", page_size=100,
        page_token=token), 100)
    assert [v.size_bytes for v in items] == [i for i in reversed(range(9001, N)) if i % 2]
    assert total == len(items)
    (only,), _ = _pages(db, lambda token: datasets.list_datasets(filter='name = "datasets/d"', page_token=token), 50)
    assert only.version_count == N


def test_list_imports_filters_the_job_store_in_sql(filled):
    db, _, _, imports = filled
    seen, token, pages = [], "", 0
    while True:
        with Recorder(db) as rec:
            page = imports.list(filter='state = JOB_STATE_FAILED AND model_version != "models/m0/versions/v00000"',
                                order_by="create_time desc", page_size=500, page_token=token)
        select_sql = rec.page_select()
        assert " WHERE " in select_sql and " LIMIT " in select_sql and "JOBS.KIND IN" in select_sql, select_sql
        assert len(page.items) <= 500
        seen += [i.job.name for i in page.items]
        pages += 1
        token = page.next_page_token
        if not token:
            break
    expected = [f"imports/{i:032x}" for i in reversed(range(5, N, 5))]
    assert seen == expected and pages == 4
    assert all(i.stage == "queued" for i in page.items)  # failed before any progress
