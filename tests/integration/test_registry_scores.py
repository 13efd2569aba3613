"""Evaluation scores on model versions and evaluation sets as datasets, through the real registry:
gRPC on loopback, the nanio S3 server, SQLite (and PostgreSQL: the tests marked ``db_backend``), the SDK's
``RegistryClient`` and the ``yard`` CLI."""

from __future__ import annotations

import asyncio
import json
import math
import os
import re
import sys

import pytest
from sqlalchemy import event, text

from modelyard.client import InvalidArgument, NotFound, RegistryClient
from modelyard.registry.v1 import registry_pb2 as pb
from services.core.db import Database
from services.core.settings import GrpcServerSettings
from services.registry.app import build_app
from services.registry.settings import RegistrySettings
from services.registry.tables import COMPONENT, MIGRATIONS, DatasetVersionRow
from tests.integration.test_registry import (  # noqa: F401 - fixtures
    create_base,
    expect,
    registry,
    store,
    tiny_model,
    upload,
)

MMLU = "benchmarks/mmlu"
GSM8K = "benchmarks/gsm8k"


def score(benchmark: str, metric: str, value: float, stderr: float = 0.0, n: int = 0) -> dict:
    return {"benchmark": benchmark, "metric": metric, "value": value, "stderr": stderr, "num_samples": n}


def table(version: pb.ModelVersion) -> list[tuple[str, str, str, float]]:
    return [(s.evaluation, s.benchmark, s.metric, s.value) for s in version.scores]


async def add_versions(registry: RegistryClient, base: pb.ModelVersion, ids: list[str]) -> list[pb.ModelVersion]:
    """More versions of ``models/tiny`` on the files of ``base`` (no upload each)."""
    return [
        await registry.create_model_version(
            parent="models/tiny", version_id=vid, model_version=pb.ModelVersion(artifact_prefix=base.artifact_prefix)
        )
        for vid in ids
    ]


# ----------------------------------------------------------------------------- scores


@pytest.mark.usefixtures("db_backend")
async def test_scores_are_recorded_replaced_per_evaluation_and_a_retry_records_once(registry, store, tiny_model):
    base = await create_base(registry, store, tiny_model)
    assert list(base.scores) == []

    first = await registry.record_evaluation_scores(
        base.name,
        "evaluations/e1",
        [
            score(MMLU, "accuracy", 0.5, 0.01, 100),
            pb.EvaluationScore(benchmark=GSM8K, metric="exact_match", value=0.25),
        ],
    )
    assert table(first) == [
        ("evaluations/e1", GSM8K, "exact_match", 0.25),
        ("evaluations/e1", MMLU, "accuracy", 0.5),
    ]
    mmlu = first.scores[1]
    assert (mmlu.stderr, mmlu.num_samples, mmlu.create_time.seconds > 0) == (0.01, 100, True)

    retried = await registry.record_evaluation_scores(
        base.name,
        "evaluations/e1",
        [score(MMLU, "accuracy", 0.5, 0.01, 100), score(GSM8K, "exact_match", 0.25)],
    )
    assert table(retried) == table(first)
    assert [s.create_time for s in retried.scores] == [s.create_time for s in first.scores]

    await asyncio.sleep(1.1)  # a later recording time, whatever the timestamp resolution
    rerun = await registry.record_evaluation_scores(base.name, "evaluations/e1", [score(MMLU, "accuracy", 0.6)])
    assert table(rerun) == [("evaluations/e1", MMLU, "accuracy", 0.6)]  # gsm8k of e1 is gone: replaced, not merged
    assert rerun.scores[0].create_time == first.scores[0].create_time  # e1 keeps its first recording time

    await asyncio.sleep(1.1)
    second = await registry.record_evaluation_scores(
        base.name, "evaluations/e2", [score(MMLU, "accuracy", 0.7, 0.02, 50)]
    )
    assert table(second) == [  # newest evaluation first
        ("evaluations/e2", MMLU, "accuracy", 0.7),
        ("evaluations/e1", MMLU, "accuracy", 0.6),
    ]
    got = await registry.get_model_version(base.name)
    assert table(got) == table(second)
    assert got.update_time == base.update_time  # scores annotate a version; they do not change it

    updated = await registry.update_model_version(
        pb.ModelVersion(name=base.name, description="still scored"), update_mask=["description"]
    )
    assert table(updated) == table(second)

    cleared = await registry.record_evaluation_scores(base.name, "evaluations/e2", [])
    assert table(cleared) == [("evaluations/e1", MMLU, "accuracy", 0.6)]


@pytest.mark.usefixtures("db_backend")
async def test_list_loads_the_scores_of_a_page_in_one_query(registry, store, tiny_model):
    base = await create_base(registry, store, tiny_model)
    others = await add_versions(registry, base, ["v2", "v3", "v4", "v5"])
    for i, v in enumerate([base, *others[:3]]):
        await registry.record_evaluation_scores(v.name, f"evaluations/run-{i}", [score(MMLU, "accuracy", i / 10)])

    statements: list[str] = []

    def seen(conn, cursor, statement, parameters, context, executemany):
        statements.append(statement)

    engine = registry.app.db.engine
    event.listen(engine, "before_cursor_execute", seen)
    try:
        page = await registry.list_model_versions(parent="models/-", order_by="name", page_size=10)
    finally:
        event.remove(engine, "before_cursor_execute", seen)
    by_name = {v.name: table(v) for v in page.model_versions}
    assert by_name == {
        "models/tiny/versions/base": [("evaluations/run-0", MMLU, "accuracy", 0.0)],
        "models/tiny/versions/v2": [("evaluations/run-1", MMLU, "accuracy", 0.1)],
        "models/tiny/versions/v3": [("evaluations/run-2", MMLU, "accuracy", 0.2)],
        "models/tiny/versions/v4": [("evaluations/run-3", MMLU, "accuracy", 0.3)],
        "models/tiny/versions/v5": [],
    }
    assert sum("registry_version_scores" in s for s in statements) == 1, statements

    two = await registry.list_model_versions(parent="models/tiny", order_by="name", page_size=2, page_token="")
    assert [len(v.scores) for v in two.model_versions] == [1, 1]


@pytest.mark.usefixtures("db_backend")
async def test_deleting_a_version_deletes_its_scores(registry, store, tiny_model):
    base = await create_base(registry, store, tiny_model)
    (v2,) = await add_versions(registry, base, ["v2"])
    await registry.record_evaluation_scores(v2.name, "evaluations/e1", [score(MMLU, "accuracy", 0.4)])
    await registry.record_evaluation_scores(base.name, "evaluations/e1", [score(MMLU, "accuracy", 0.3)])

    await registry.delete_model_version(v2.name)
    with registry.app.db.engine.connect() as conn:
        left = conn.execute(text("SELECT version FROM registry_version_scores")).scalars().all()
    assert left == [base.name]
    (again,) = await add_versions(registry, base, ["v2"])  # the same name again starts without scores
    assert list(again.scores) == []


@pytest.mark.usefixtures("db_backend")
async def test_bad_score_requests_name_the_field_and_record_nothing(registry, store, tiny_model):
    base = await create_base(registry, store, tiny_model)
    good = score(MMLU, "accuracy", 0.5)
    cases = [
        ("evals/e1", [good], "evaluation"),
        ("evaluations/Bad Name", [good], "evaluation"),
        ("", [good], "evaluation"),
        ("evaluations/e1", [good, score(MMLU, "", 0.5)], "scores[1].metric"),
        ("evaluations/e1", [good, score(GSM8K, "exact_match", math.nan)], "scores[1].value"),
        ("evaluations/e1", [score(GSM8K, "exact_match", math.inf)], "scores[0].value"),
        ("evaluations/e1", [score(GSM8K, "exact_match", 0.5, stderr=math.nan)], "scores[0].stderr"),
        ("evaluations/e1", [score(GSM8K, "exact_match", 0.5, stderr=-1)], "scores[0].stderr"),
        ("evaluations/e1", [score(GSM8K, "exact_match", 0.5, n=-3)], "scores[0].num_samples"),
        ("evaluations/e1", [score("mmlu", "accuracy", 0.5)], "scores[0].benchmark"),
        ("evaluations/e1", [score("benchmarks/", "accuracy", 0.5)], "scores[0].benchmark"),
        ("evaluations/e1", [good, good], "scores[1]"),
        ("evaluations/e1", [{**good, "evaluation": "evaluations/e2"}], "scores[0].evaluation"),
    ]
    for evaluation, scores, field in cases:
        with pytest.raises(InvalidArgument) as err:
            await registry.record_evaluation_scores(base.name, evaluation, scores)
        assert [v.field for v in err.value.violations] == [field], (evaluation, scores, err.value.message)
        assert field in err.value.message

    await expect(
        registry.record_evaluation_scores("models/tiny/versions/nope", "evaluations/e1", [good]),
        NotFound,
        "VERSION_NOT_FOUND",
    )
    await expect(
        registry.record_evaluation_scores("tiny/base", "evaluations/e1", [good]), InvalidArgument, "INVALID_NAME"
    )
    custom = await registry.record_evaluation_scores(
        base.name, "evaluations/e1", [score("benchmarks/custom:my-set", "accuracy", 1.0)]
    )
    assert table(custom) == [("evaluations/e1", "benchmarks/custom:my-set", "accuracy", 1.0)]  # the only one stored


async def test_an_existing_database_gains_the_scores_table_in_place(tmp_path, s3_settings, store, tiny_model,
                                                                   db_backend):
    settings = RegistrySettings(
        data_dir=tmp_path / "data", s3=s3_settings, grpc=GrpcServerSettings(port=0), import_workers=1,
        worker_poll_interval_s=0.1, hf_endpoint="http://127.0.0.1:9", hf_token=None,
        database_url=db_backend.service_url("registry"),
    )  # fmt: skip

    async def running() -> tuple[object, RegistryClient]:
        app = build_app(settings, metrics=False, default_port=0)
        await app.start()
        return app, RegistryClient(f"127.0.0.1:{app.server.port}", timeout=120)

    app, client = await running()
    base = await create_base(client, store, tiny_model)
    await client.close()
    await app.stop(grace=1)

    # Make it the database an older registry left behind: schema version 2, no scores table, no image counts.
    url = settings.db_url_for("registry")
    db = Database(url)
    with db.engine.begin() as conn:
        conn.execute(text("DROP TABLE registry_version_scores"))
        conn.execute(text(f"ALTER TABLE {DatasetVersionRow.__tablename__} DROP COLUMN image_count"))
        conn.execute(text("DELETE FROM schema_migrations WHERE component = 'registry' AND version >= 3"))
    assert db.schema_version(COMPONENT) == 2
    db.dispose()

    app, client = await running()
    try:
        assert app.db.schema_version(COMPONENT) == MIGRATIONS[-1].version == 4
        kept = await client.get_model_version(base.name)
        assert kept.name == base.name and list(kept.scores) == []
        scored = await client.record_evaluation_scores(base.name, "evaluations/e1", [score(MMLU, "accuracy", 0.5)])
        assert table(scored) == [("evaluations/e1", MMLU, "accuracy", 0.5)]
    finally:
        await client.close()
        await app.stop(grace=1)


async def test_yard_models_show_prints_the_scores_newest_evaluation_first(registry, store, tiny_model):
    base = await create_base(registry, store, tiny_model)
    (bare,) = await add_versions(registry, base, ["bare"])
    await registry.record_evaluation_scores(
        base.name, "evaluations/old", [score(MMLU, "accuracy", 0.41, 0.02, 100), score(GSM8K, "exact_match", 0.2)]
    )
    await asyncio.sleep(1.1)
    await registry.record_evaluation_scores(base.name, "evaluations/new", [score(MMLU, "accuracy", 0.5, 0.0123, 200)])

    async def yard(*args: str) -> str:
        env = dict(os.environ, YARD_REGISTRY_ADDR=f"127.0.0.1:{registry.app.server.port}", COLUMNS="200")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cli.main", *args, env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        )  # fmt: skip
        out, _ = await asyncio.wait_for(proc.communicate(), 120)
        assert proc.returncode == 0, out.decode()
        return out.decode()

    shown = (await yard("models", "show", "tiny/base")).splitlines()
    start = shown.index("scores")
    lines = [" ".join(line.split()) for line in shown[start + 1 : start + 3]]
    when = r"\d{4}-\d\d-\d\d \d\d:\d\d"
    assert re.fullmatch(rf"benchmarks/mmlu accuracy 0\.5000 ± 0\.0123 \(n=200\) evaluations/new {when}", lines[0])
    assert re.fullmatch(rf"benchmarks/gsm8k exact_match 0\.2000 evaluations/old {when}", lines[1])
    assert "1 older score of the same benchmarks not shown" in shown[start + 3]
    assert "0.41" not in "\n".join(shown)

    as_json = json.loads(await yard("models", "show", "tiny/base", "-o", "json"))
    assert [(s["evaluation"], s["benchmark"]) for s in as_json["scores"]] == [
        ("evaluations/new", MMLU),
        ("evaluations/old", GSM8K),
        ("evaluations/old", MMLU),
    ]
    assert "scores" not in (await yard("models", "show", bare.name)).splitlines()


# ----------------------------------------------------------------------------- evaluation sets


def _mc_rows(n: int = 10) -> list[dict]:
    answers = [1, "Paris", "B"]  # an index, the choice text, a letter
    return [
        {"id": f"q{i}", "question": f"Question {i}: the capital of France?", "choices": ["Berlin", "Paris", "Rome"],
         "answer": answers[i % 3]}
        for i in range(1, n + 1)
    ]  # fmt: skip


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.mark.usefixtures("db_backend")
async def test_evaluation_sets_upload_and_a_planted_bad_row_is_refused_naming_row_and_field(
    registry, store, tiny_model, tmp_path
):
    mc = await upload(registry, tmp_path, "mc.jsonl", _jsonl(_mc_rows()), parent="datasets/mc-eval", chunk=64)
    assert (mc.format, mc.row_count, mc.invalid_row_count) == ("multiple_choice", 10, 0)
    qa_rows = [{"prompt": f"{i} + {i} = ?", "reference": str(2 * i)} for i in range(5)]
    qa = await upload(registry, tmp_path, "qa.jsonl", _jsonl(qa_rows), parent="datasets/qa-eval", chunk=64)
    assert (qa.format, qa.row_count, qa.invalid_row_count) == ("qa", 5, 0)

    base = await create_base(registry, store, tiny_model)
    report = await registry.validate_dataset(mc.name, model_version=base.name, max_length=4)
    assert (report.format, report.valid_row_count, list(report.errors)) == ("multiple_choice", 10, [])
    assert report.token_stats.rows == 10 and report.token_stats.rows_over_max_length == 10
    assert report.token_stats.max_tokens >= report.token_stats.min_tokens > 4

    bad = _mc_rows()
    bad[3]["answer"] = 7  # row 4
    err = await expect(
        upload(registry, tmp_path, "mc.jsonl", _jsonl(bad), parent="datasets/mc-eval", chunk=64),
        InvalidArgument,
        "DATASET_INVALID_ROWS",
    )
    assert "row 4 answer: index 7 out of range (3 choices: 0-2)" in err.message
    assert [(v.field, v.description) for v in err.violations] == [
        ("answer", "row 4: index 7 out of range (3 choices: 0-2)")
    ]
    assert err.metadata["rows"] == "4"

    dup = [*qa_rows, {"prompt": "again", "reference": "x", "id": "a"}, {"prompt": "more", "reference": "y", "id": "a"}]
    err = await expect(
        upload(registry, tmp_path, "qa.jsonl", _jsonl(dup), parent="datasets/qa-eval", chunk=64),
        InvalidArgument,
        "DATASET_INVALID_ROWS",
    )
    assert "row 7 id: duplicate id 'a' (first used in row 6)" in err.message

    stray = [*_mc_rows(3), {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}]
    err = await expect(
        upload(registry, tmp_path, "mixed.jsonl", _jsonl(stray), parent="datasets/mc-eval", chunk=64),
        InvalidArgument,
        "DATASET_INVALID_ROWS",
    )
    assert "row 4: row is in messages format, but most rows are multiple_choice" in err.message

    # Nothing of the refused uploads was kept.
    assert (await registry.list_dataset_versions(parent="datasets/mc-eval")).total_size == 1
    assert (await registry.list_dataset_versions(parent="datasets/qa-eval")).total_size == 1
    assert [o.key for o in store.list("datasets/mc-eval")] == [mc.artifact_key]

    as_expected = await upload(
        registry, tmp_path, "mc.json", json.dumps(_mc_rows(4)).encode(), parent="datasets/mc-eval", chunk=64
    )
    assert (as_expected.format, as_expected.row_count) == ("multiple_choice", 4)
    listed = await registry.list_dataset_versions(parent="datasets/-", filter='format = "multiple_choice"')
    assert sorted(v.name for v in listed.dataset_versions) == [mc.name, as_expected.name]
