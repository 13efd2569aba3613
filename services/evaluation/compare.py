"""CompareEvaluations: metrics side by side, paired differences with a confidence interval, changed samples.

Every evaluation after the first is compared with the first on the documents both scored (same benchmark,
same ``doc_id``): the delta of a metric is the mean of the per-document differences, its 95% interval the
normal approximation ``mean ± 1.96 · sd / sqrt(n)`` of those differences (a paired interval: the
document-to-document variance that both runs share cancels, so it is much narrower than comparing two
independent means). Metrics without per-document values (e.g. pass@k over several samples) get a delta
from the aggregate values and no interval.
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from services.core.errors import FailedPrecondition
from services.core.jobs import JobRecord, JobState

Z95 = 1.959963984540054

SampleLoader = Callable[[str], Awaitable[list[dict[str, Any]]]]


@dataclass
class Delta:
    evaluation: str
    delta: float
    ci_low: float
    ci_high: float
    paired_samples: int


@dataclass
class Row:
    benchmark: str
    metric: str
    values: list[tuple[float, float] | None]  # (value, stderr) per evaluation
    deltas: list[Delta] = field(default_factory=list)


@dataclass
class Changed:
    benchmark: str
    doc_id: str
    evaluation: str
    baseline_score: float
    score: float
    baseline_prediction: str
    prediction: str
    reference: str


@dataclass
class Comparison:
    evaluations: list[str]
    rows: list[Row]
    changed: list[Changed]


def paired_delta(base: Sequence[float], other: Sequence[float]) -> tuple[float, float, float]:
    """Mean of ``other - base`` and its 95% normal interval (zero width for one pair)."""
    diffs = [b - a for a, b in zip(base, other, strict=True)]
    n = len(diffs)
    if n == 0:
        return math.nan, math.nan, math.nan
    mean = sum(diffs) / n
    if n < 2:
        return mean, mean, mean
    var = sum((d - mean) ** 2 for d in diffs) / (n - 1)
    half = Z95 * math.sqrt(var / n)
    return mean, mean - half, mean + half


def _results(job: JobRecord) -> dict[str, dict[str, Any]]:
    return {r["benchmark"]: r for r in (job.outputs or {}).get("results", []) if not r.get("error")}


async def compare_records(
    jobs: list[JobRecord], wanted: list[str], max_changed: int, load_samples: SampleLoader
) -> Comparison:
    not_done = [j.name for j in jobs if j.state is not JobState.SUCCEEDED and not _results(j)]
    if not_done:
        raise FailedPrecondition(
            f"no results yet in {', '.join(not_done)} (an evaluation is compared once it has results)",
            reason="EVALUATION_NOT_FINISHED",
        )
    per_job = [_results(j) for j in jobs]
    names = wanted or sorted({b for results in per_job for b in results})
    rows: list[Row] = []
    changed: list[Changed] = []
    for bench in names:
        present = [results.get(bench) for results in per_job]
        if all(p is None for p in present):
            continue
        metrics = []
        for p in present:
            for m in (p or {}).get("metrics", {}):
                if m not in metrics:
                    metrics.append(m)
        samples: list[dict[str, dict[str, Any]] | None] = []
        for p in present:
            key = (p or {}).get("predictions_artifact_key")
            samples.append({str(s["doc_id"]): s for s in await load_samples(key)} if key else None)
        primary = next((p.get("primary_metric") for p in present if p and p.get("primary_metric")), None)
        for metric in metrics:
            values = [
                (p["metrics"][metric], p.get("stderr", {}).get(metric, math.nan))
                if p and metric in p["metrics"]
                else None
                for p in present
            ]
            row = Row(bench, metric, values)
            base = samples[0]
            for j in range(1, len(jobs)):
                other = samples[j]
                v0, vj = values[0], values[j]
                if v0 is None or vj is None:
                    continue
                if base is None or other is None:
                    d = vj[0] - v0[0]
                    row.deltas.append(Delta(jobs[j].name, d, math.nan, math.nan, 0))
                    continue
                ids = [i for i in base if i in other and metric in base[i]["metrics"] and metric in other[i]["metrics"]]
                if not ids:
                    d = vj[0] - v0[0]
                    row.deltas.append(Delta(jobs[j].name, d, math.nan, math.nan, 0))
                    continue
                mean, lo, hi = paired_delta(
                    [float(base[i]["metrics"][metric]) for i in ids], [float(other[i]["metrics"][metric]) for i in ids]
                )
                row.deltas.append(Delta(jobs[j].name, mean, lo, hi, len(ids)))
                if metric == (primary or metrics[0]):
                    changed += _changed(bench, metric, jobs[j].name, base, other, ids, max_changed)
            rows.append(row)
    return Comparison([j.name for j in jobs], rows, changed)


def _changed(
    bench: str,
    metric: str,
    evaluation: str,
    base: dict[str, dict[str, Any]],
    other: dict[str, dict[str, Any]],
    ids: list[str],
    limit: int,
) -> list[Changed]:
    out = []
    for i in ids:
        a, b = float(base[i]["metrics"][metric]), float(other[i]["metrics"][metric])
        if a == b:
            continue
        out.append(
            Changed(
                bench,
                i,
                evaluation,
                a,
                b,
                str(base[i].get("prediction", "")),
                str(other[i].get("prediction", "")),
                str(other[i].get("reference", "")),
            )
        )
        if len(out) >= limit:
            break
    return out
