"""The catalogue of runnable benchmark names and ``resolve`` from a name (+ options) to a :class:`Benchmark`."""

from __future__ import annotations

import difflib
from functools import cache

from services.core.errors import InvalidArgument
from services.evaluation.benchmarks import tasks as T
from services.evaluation.benchmarks.descriptions import (
    BBH_DESCRIPTIONS,
    CEVAL_DESCRIPTIONS,
    CMMLU_DESCRIPTIONS,
    MMLU_DESCRIPTIONS,
)
from services.evaluation.benchmarks.types import BenchmarkInfo

_FEWSHOT = {"num_fewshot": "few-shot examples per question (default {d})"}
_SOURCE = {"source": "auto | bundled | hub: bundled data unless 'hub' is asked (default auto)"}
_GEN = {"max_tokens": "most tokens generated per answer (default {m})"}
_MC_METRICS = ["acc", "acc_norm"]


def _opts(*parts: dict[str, str], **fmt) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in parts:
        out.update({k: v.format(**fmt) for k, v in p.items()})
    return out


def _title(subject: str) -> str:
    return subject.replace("_", " ")


@cache
def _catalogue() -> dict[str, BenchmarkInfo]:
    infos: list[BenchmarkInfo] = []
    add = infos.append
    for task in T.BBH_TASKS:
        bundled = task in T.BBH_BUNDLED
        n = len(T._bbh_bundled(task)) if bundled else 0
        opts = _opts(_FEWSHOT, _GEN, _SOURCE if bundled else {}, d=0, m=T.DEFAULT_MAX_GEN_TOKS)
        add(
            BenchmarkInfo(
                name=f"bbh:{task}",
                display_name=f"BBH {_title(task)} (zero-shot)",
                description=f"BIG-Bench Hard, {BBH_DESCRIPTIONS[task].strip()} Generation scored by exact match, as "
                f"lm-eval's bbh_zeroshot_{task}.",
                kind="generation",
                metrics=["exact_match,flexible-extract", "exact_match,strict-match"],
                options=opts,
                num_samples=n,
                default_num_fewshot=0,
                source="bundled" if bundled else "hub",
            )
        )
    for task in T.BBH_MC_TASKS:
        bundled = task in T.BBH_BUNDLED
        n = len(T._bbh_bundled(task)) if bundled else 0
        add(
            BenchmarkInfo(
                name=f"bbh_mc:{task}",
                display_name=f"BBH {_title(task)} (multiple choice)",
                description=f"BIG-Bench Hard {_title(task)} scored by log-likelihood over its closed answer set "
                "(ModelYard's variant; lm-eval scores BBH by generation).",
                kind="multiple_choice",
                metrics=list(_MC_METRICS),
                options=_opts(_FEWSHOT, _SOURCE if bundled else {}, d=0),
                num_samples=n,
                default_num_fewshot=0,
                source="bundled" if bundled else "hub",
            )
        )
    add(
        BenchmarkInfo(
            name="gsm8k",
            display_name="GSM8K",
            description="Grade-school math word problems, 5-shot chain of "
            "thought answers ending in '#### <number>' (lm-eval gsm8k).",
            kind="generation",
            metrics=["exact_match,strict-match", "exact_match,flexible-extract"],
            options=_opts(_FEWSHOT, _GEN, _SOURCE, d=5, m=T.DEFAULT_MAX_GEN_TOKS),
            num_samples=1319,
            default_num_fewshot=5,
            source="bundled",
        )
    )
    add(
        BenchmarkInfo(
            name="mmlu",
            display_name="MMLU",
            description="57 subjects of four-option questions (cais/mmlu), "
            "lm-eval mmlu: all subjects, or those named in option 'subjects'; acc over all questions.",
            kind="multiple_choice",
            metrics=["acc"],
            options=_opts(_FEWSHOT, {"subjects": "comma-separated MMLU subjects (default: all 57)"}, d=0),
            num_samples=14042,
            default_num_fewshot=0,
            source="hub",
        )
    )
    for subject in MMLU_DESCRIPTIONS:
        add(
            BenchmarkInfo(
                name=f"mmlu:{subject}",
                display_name=f"MMLU {_title(subject)}",
                description=MMLU_DESCRIPTIONS[subject].strip(),
                kind="multiple_choice",
                metrics=["acc"],
                options=_opts(_FEWSHOT, d=0),
                num_samples=0,
                default_num_fewshot=0,
                source="hub",
            )
        )
    for subject in CMMLU_DESCRIPTIONS:
        add(
            BenchmarkInfo(
                name=f"cmmlu:{subject}",
                display_name=f"CMMLU {_title(subject)}",
                description=CMMLU_DESCRIPTIONS[subject].strip(),
                kind="multiple_choice",
                metrics=list(_MC_METRICS),
                options=_opts(_FEWSHOT, d=0),
                num_samples=0,
                default_num_fewshot=0,
                source="hub",
            )
        )
    for subject in CEVAL_DESCRIPTIONS:
        add(
            BenchmarkInfo(
                name=f"ceval:{subject}",
                display_name=f"C-Eval {_title(subject)} (val)",
                description=CEVAL_DESCRIPTIONS[subject].strip(),
                kind="multiple_choice",
                metrics=list(_MC_METRICS),
                options=_opts(_FEWSHOT, d=0),
                num_samples=0,
                default_num_fewshot=0,
                source="hub",
            )
        )
    for name, label, n in (("arc_easy", "ARC-Easy", 2376), ("arc_challenge", "ARC-Challenge", 1172)):
        add(
            BenchmarkInfo(
                name=name,
                display_name=label,
                description=f"AI2 Reasoning Challenge ({label}) science questions, "
                "scored by log-likelihood of each answer text (lm-eval).",
                kind="multiple_choice",
                metrics=list(_MC_METRICS),
                options=_opts(_FEWSHOT, d=0),
                num_samples=n,
                default_num_fewshot=0,
                source="hub",
            )
        )
    add(
        BenchmarkInfo(
            name="hellaswag",
            display_name="HellaSwag",
            description="Commonsense sentence completion (validation split, lm-eval preprocessing).",
            kind="multiple_choice",
            metrics=list(_MC_METRICS),
            options=_opts(_FEWSHOT, d=0),
            num_samples=10042,
            default_num_fewshot=0,
            source="hub",
        )
    )
    for variant in ("mc1", "mc2"):
        add(
            BenchmarkInfo(
                name=f"truthfulqa_{variant}",
                display_name=f"TruthfulQA {variant.upper()}",
                description="TruthfulQA multiple choice, "
                + (
                    "acc of the single true answer."
                    if variant == "mc1"
                    else "normalised probability mass of the true answers."
                ),
                kind="multiple_choice",
                metrics=["acc"],
                options={},
                num_samples=817,
                default_num_fewshot=0,
                source="hub",
            )
        )
    add(
        BenchmarkInfo(
            name="humaneval",
            display_name="HumanEval",
            description="164 Python functions to complete, scored by running "
            "their unit tests in the sandbox (pass@k, lm-eval humaneval prompt).",
            kind="code",
            metrics=["pass@1"],
            options={
                "n": "samples per problem (default 1)",
                "k": "comma-separated k of pass@k, each <= n (default 1)",
                "temperature": "sampling temperature (default 0 for n=1, else 0.8)",
                "max_tokens": "most tokens per completion (default 1024)",
                "timeout_s": "sandbox seconds per program (default 10)",
                **_SOURCE,
            },
            num_samples=164,
            default_num_fewshot=0,
            source="bundled",
        )
    )
    return {i.name: i for i in infos}


def list_benchmarks() -> list[BenchmarkInfo]:
    """One entry per runnable name, in catalogue order."""
    return list(_catalogue().values())


def _with_metrics(info: BenchmarkInfo, metrics: list[str]) -> BenchmarkInfo:
    from dataclasses import replace

    return replace(info, metrics=metrics)


def resolve(name: str, options: dict[str, str] | None = None, *, field: str = "benchmark") -> T.Benchmark:
    """The benchmark called ``name``; InvalidArgument on ``field`` for an unknown name (with close names) or an
    unknown or bad option (naming the key)."""
    catalogue = _catalogue()
    key = (name or "").strip()
    info = catalogue.get(key)
    if info is None:
        close = difflib.get_close_matches(key, list(catalogue), n=3, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see the benchmark list for the names"
        raise InvalidArgument.for_field(field, f"unknown benchmark {key!r}{hint}", reason="BENCHMARK_UNKNOWN")
    opts = {str(k): str(v) for k, v in (options or {}).items()}
    unknown = sorted(set(opts) - set(info.options))
    if unknown:
        allowed = ", ".join(sorted(info.options)) or "none"
        raise InvalidArgument.for_field(
            f"{field}.options.{unknown[0]}",
            f"{key} has no option {unknown[0]!r} (options: {allowed})",
            reason="BENCHMARK_OPTION_UNKNOWN",
        )
    family, _, sub = key.partition(":")
    if family == "bbh":
        return T.BBHZeroShot(info, opts, field=field, task=sub)
    if family == "bbh_mc":
        return T.BBHMultipleChoice(info, opts, field=field, task=sub)
    if family == "mmlu":
        if sub:
            return T.MMLU(info, opts, field=field, subjects=[sub])
        raw = opts.get("subjects", "")
        subjects = [s.strip() for s in raw.split(",") if s.strip()] or list(MMLU_DESCRIPTIONS)
        bad = [s for s in subjects if s not in MMLU_DESCRIPTIONS]
        if bad:
            raise InvalidArgument.for_field(
                f"{field}.options.subjects", f"unknown MMLU subject {bad[0]!r}", reason="BENCHMARK_OPTION_INVALID"
            )
        return T.MMLU(info, opts, field=field, subjects=subjects)
    if family == "cmmlu":
        return T.CMMLU(info, opts, field=field, subjects=[sub])
    if family == "ceval":
        return T.CEval(info, opts, field=field, subjects=[sub])
    if key in ("arc_easy", "arc_challenge"):
        return T.ARC(info, opts, field=field, config="ARC-Easy" if key == "arc_easy" else "ARC-Challenge")
    if key == "hellaswag":
        return T.HellaSwag(info, opts, field=field)
    if key.startswith("truthfulqa_"):
        return T.TruthfulQA(info, opts, field=field, variant=key.split("_", 1)[1])
    if key == "gsm8k":
        return T.GSM8K(info, opts, field=field)
    if key == "humaneval":
        bench = T.HumanEval(info, opts, field=field)
        bench.info = _with_metrics(info, [f"pass@{k}" for k in bench.ks])
        return bench
    raise InvalidArgument.for_field(field, f"unknown benchmark {key!r}", reason="BENCHMARK_UNKNOWN")
