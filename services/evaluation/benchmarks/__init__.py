"""The evaluation service's benchmark library: catalogue, loaders, prompt formats (lm-evaluation-harness 0.4.13's
task definitions), scoring and metrics. Pure Python; the evaluation job calls it.

    bench = resolve("gsm8k", {"num_fewshot": "5"})
    docs = bench.load(DataSource(cache_dir=...))
    for i, doc in enumerate(docs.test):
        req = bench.build(doc, i, bench.fewshot_examples(docs, doc, bench.num_fewshot), chat=False)
        ... run req on the model -> MCResult / GenResult ...
        scores.append(bench.score(doc, req, result))
    aggregate(bench.info, scores)
"""

from services.evaluation.benchmarks.catalogue import list_benchmarks, resolve
from services.evaluation.benchmarks.custom import custom_benchmark
from services.evaluation.benchmarks.metrics import aggregate
from services.evaluation.benchmarks.tasks import Benchmark
from services.evaluation.benchmarks.types import (
    BenchmarkInfo,
    DataSource,
    Docs,
    GenRequest,
    GenResult,
    MCRequest,
    MCResult,
    RowIssue,
    SampleScore,
)

__all__ = [
    "Benchmark",
    "BenchmarkInfo",
    "DataSource",
    "Docs",
    "GenRequest",
    "GenResult",
    "MCRequest",
    "MCResult",
    "RowIssue",
    "SampleScore",
    "aggregate",
    "custom_benchmark",
    "list_benchmarks",
    "resolve",
]
