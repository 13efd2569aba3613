"""Evaluation scores recorded on model versions: checking what an evaluation sends, and reading them back.

A version holds, per evaluation, one score per (benchmark, metric). Recording an evaluation's scores
replaces everything that evaluation recorded on the version before, so a retried evaluation records
once; the time of its first recording is kept.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from services.core.errors import InvalidArgument

from .names import check_id
from .records import EvaluationScore
from .tables import ScoreRow

_BENCHMARK_RE = re.compile(r"^benchmarks/[^\s/]{1,200}$")
_MAX_METRIC = 200
_MAX_SCORES = 10_000


def check_evaluation(name: str, field: str = "evaluation") -> str:
    """``evaluations/{id}`` or InvalidArgument naming ``field``."""
    parts = (name or "").split("/")
    if len(parts) != 2 or parts[0] != "evaluations":
        raise InvalidArgument.for_field(field, f"{name!r} is not of the form evaluations/{{id}}", reason="INVALID_NAME")
    check_id(parts[1], field)
    return name


def check_scores(evaluation: str, scores: Sequence[EvaluationScore]) -> list[EvaluationScore]:
    """The scores with ``evaluation`` filled in; InvalidArgument naming ``scores[i].field`` for a bad one."""
    if len(scores) > _MAX_SCORES:
        raise InvalidArgument.for_field("scores", f"at most {_MAX_SCORES} scores per call, got {len(scores)}")
    seen: dict[tuple[str, str], int] = {}
    out = []
    for i, score in enumerate(scores):
        at = f"scores[{i}]"
        if score.evaluation and score.evaluation != evaluation:
            raise InvalidArgument.for_field(
                f"{at}.evaluation", f"{score.evaluation!r} differs from the request's evaluation {evaluation!r}"
            )
        if not _BENCHMARK_RE.match(score.benchmark or ""):
            raise InvalidArgument.for_field(
                f"{at}.benchmark",
                f"{score.benchmark!r} is not of the form benchmarks/{{benchmark}}",
                reason="INVALID_NAME",
            )
        metric = score.metric or ""
        if not metric.strip():
            raise InvalidArgument.for_field(f"{at}.metric", "must not be empty")
        if len(metric) > _MAX_METRIC or any(c.isspace() and c != " " for c in metric):
            raise InvalidArgument.for_field(
                f"{at}.metric", f"must be at most {_MAX_METRIC} characters without tabs or newlines"
            )
        if not math.isfinite(score.value):
            raise InvalidArgument.for_field(f"{at}.value", f"must be a finite number, got {score.value}")
        if not (math.isfinite(score.stderr) and score.stderr >= 0):
            raise InvalidArgument.for_field(
                f"{at}.stderr", f"must be a finite number >= 0 (0 when unknown), got {score.stderr}"
            )
        if score.num_samples < 0:
            raise InvalidArgument.for_field(f"{at}.num_samples", f"must not be negative, got {score.num_samples}")
        key = (score.benchmark, metric)
        if key in seen:
            raise InvalidArgument.for_field(
                at, f"benchmark {score.benchmark!r} metric {metric!r} is already scores[{seen[key]}]"
            )
        seen[key] = i
        out.append(
            EvaluationScore(
                evaluation, score.benchmark, metric, float(score.value), float(score.stderr), int(score.num_samples)
            )
        )
    return out


def replace_scores(s: Session, version: str, evaluation: str, scores: Sequence[EvaluationScore], now: datetime) -> None:
    """Replace every score ``evaluation`` recorded on ``version`` (its first recording time is kept)."""
    first = s.scalars(
        select(ScoreRow.create_time).where(ScoreRow.version == version, ScoreRow.evaluation == evaluation).limit(1)
    ).first()
    s.execute(delete(ScoreRow).where(ScoreRow.version == version, ScoreRow.evaluation == evaluation))
    created = first or now
    s.add_all(
        ScoreRow(
            version=version,
            evaluation=evaluation,
            benchmark=x.benchmark,
            metric=x.metric,
            value=x.value,
            stderr=x.stderr,
            num_samples=x.num_samples,
            create_time=created,
        )
        for x in scores
    )
    s.flush()


def scores_of(s: Session, versions: Iterable[str]) -> dict[str, list[EvaluationScore]]:
    """The scores of each version, newest evaluation first, in one query."""
    names = list(dict.fromkeys(versions))
    out: dict[str, list[EvaluationScore]] = {name: [] for name in names}
    if not names:
        return out
    rows = s.scalars(
        select(ScoreRow)
        .where(ScoreRow.version.in_(names))
        .order_by(ScoreRow.create_time.desc(), ScoreRow.evaluation, ScoreRow.benchmark, ScoreRow.metric)
    )
    for r in rows:
        out[r.version].append(
            EvaluationScore(r.evaluation, r.benchmark, r.metric, r.value, r.stderr, r.num_samples, r.create_time)
        )
    return out


def delete_scores(s: Session, version: str) -> None:
    s.execute(delete(ScoreRow).where(ScoreRow.version == version))
