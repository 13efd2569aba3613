"""The report of an eval step: one row per target (score with its 95% interval, size on disk, decode speed),
the paired deltas against the first row (CompareEvaluations), step wall times, and the notes a reader must see
(a version derived from another row's version, e.g. quantized from the tuned model, that lost more than
``max_drop_points``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from modelyard.client import NotFound

from . import document as D

if TYPE_CHECKING:
    from .runner import _Run

Z95 = 1.959964


async def primary_metric(run: _Run, benchmark: str) -> str:
    name = f"benchmarks/{benchmark.removeprefix('benchmarks/')}"
    page = await run.evaluation.list_benchmarks(filter=f'name = "{name}"')
    return page.benchmarks[0].metrics[0] if page.benchmarks and page.benchmarks[0].metrics else "acc"


async def build_report(run: _Run, step: D.EvalStep, result: dict[str, Any], step_times: list[dict]) -> dict[str, Any]:
    rows_state = run.steps[step.id]["rows"]
    labels = list(step.targets)
    names = [rows_state[label]["evaluation"] for label in labels]
    benchmark = f"benchmarks/{step.benchmarks[0].removeprefix('benchmarks/')}"
    metric = await primary_metric(run, benchmark)
    cmp = await run.evaluation.compare_evaluations(names, benchmarks=[benchmark])
    line = next((r for r in cmp.rows if r.metric == metric), cmp.rows[0] if cmp.rows else None)
    rows: list[dict[str, Any]] = []
    for i, label in enumerate(labels):
        st = rows_state[label]
        ev = await run.evaluation.get_evaluation(st["evaluation"])
        res = ev.outputs.results[0] if ev.outputs.results else None
        value = line.values[i] if line is not None and i < len(line.values) else None
        score = (
            value.value
            if value is not None and value.HasField("value")
            else (res.metrics.get(metric, 0.0) if res else 0.0)
        )
        stderr = value.stderr if value is not None and value.HasField("stderr") else 0.0
        size = 0
        try:
            version = await run.registry.get_model_version(st["model_version"])
            size = sum(f.size_bytes for f in version.files)
            parent = version.lineage.base_model_version
        except NotFound:
            parent = ""
        rows.append({
            "label": label, "model_version": st["model_version"], "evaluation": st["evaluation"],
            "score": score, "score_ci95": Z95 * stderr, "num_samples": res.num_samples if res else 0,
            "size_bytes": size, "decode_tokens_per_second": st.get("decode_tokens_per_second", 0.0), "parent": parent,
        })  # fmt: skip
    deltas = []
    if line is not None:
        by_name = {d.evaluation: d for d in line.deltas}
        for row in rows[1:]:
            d = by_name.get(row["evaluation"])
            if d is not None:
                deltas.append({"label": row["label"], "baseline": rows[0]["label"], "delta": d.delta,
                               "ci95_low": d.ci_low, "ci95_high": d.ci_high})  # fmt: skip
    notes = []
    for row in rows:
        src = next((r for r in rows if r["model_version"] == row["parent"]), None)
        if src is not None:
            drop = (src["score"] - row["score"]) * 100
            if drop > step.max_drop_points:
                notes.append(f"{row['label']} loses {drop:.1f} points of {metric} against {src['label']}, which it was "
                             f"made from (more than {step.max_drop_points:g})")  # fmt: skip
    for d in deltas:
        verdict = "excludes zero" if d["ci95_low"] > 0 or d["ci95_high"] < 0 else "includes zero: not significant"
        notes.append(f"{d['label']} - {d['baseline']}: {d['delta'] * 100:+.1f} points, 95% CI "
                     f"[{d['ci95_low'] * 100:+.1f}, {d['ci95_high'] * 100:+.1f}] ({verdict})")  # fmt: skip
    for row in rows:
        row.pop("parent")
    return {"benchmark": benchmark, "metric": metric, "rows": rows, "deltas": deltas, "notes": notes,
            "step_times": step_times}  # fmt: skip
