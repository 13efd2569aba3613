"""Units of the evaluation service that need no running service: the paired interval of CompareEvaluations,
cutting generations at stop sequences, the temporary deployment's name, the CLI's target and benchmark
parsing, and the HumanEval scoring path through the real sandbox for hostile completions."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from cli.common import CliError
from cli.eval_cmds import parse_benchmark, parse_target
from modelyard.evaluation.v1 import evaluation_pb2 as epb
from services.evaluation import benchmarks as bm
from services.evaluation.compare import Z95, paired_delta
from services.evaluation.domain import temporary_deployment_id
from services.evaluation.job import _truncate


def test_paired_delta_is_the_mean_difference_with_a_normal_interval():
    base = [1, 0, 1, 1, 0, 0, 1, 0, 1, 1]
    other = [1, 1, 1, 1, 0, 1, 1, 0, 0, 1]
    mean, lo, hi = paired_delta(base, other)
    diffs = [b - a for a, b in zip(base, other, strict=True)]
    assert mean == pytest.approx(statistics.mean(diffs))
    half = Z95 * statistics.stdev(diffs) / math.sqrt(len(diffs))
    assert (lo, hi) == pytest.approx((mean - half, mean + half))
    same = paired_delta([1, 0, 1], [1, 0, 1])
    assert same == (0.0, 0.0, 0.0)
    assert all(math.isnan(x) for x in paired_delta([], []))


def test_truncate_cuts_at_the_first_stop_sequence():
    assert _truncate("42\n\nQuestion: next", ["Question:", "\n\n"]) == "42"
    assert _truncate("no stop here", ["</s>"]) == "no stop here"
    assert _truncate("a<|im_end|>b", ["", "<|im_end|>"]) == "a"


def test_temporary_deployment_ids_are_valid_and_stable():
    short = temporary_deployment_id("evaluations/eval-1234")
    assert short == "ev-eval-1234"
    long_id = "x" * 63
    a, b = temporary_deployment_id(f"evaluations/{long_id}"), temporary_deployment_id(f"evaluations/{long_id}")
    assert a == b and len(a) <= 63 and a.startswith("ev-")


def test_cli_targets_and_benchmarks():
    spec = epb.EvaluationSpec()
    parse_target("smollm2/v1", None, None, spec)
    assert spec.model_version == "models/smollm2/versions/v1"
    spec = epb.EvaluationSpec()
    parse_target("deployments/chat:tuned", None, None, spec)
    assert (spec.deployment, spec.adapter) == ("deployments/chat", "tuned")
    spec = epb.EvaluationSpec()
    parse_target("http://host:8000/v1", "gpt", "k", spec)
    assert (spec.endpoint.base_url, spec.endpoint.model, spec.endpoint.api_key) == ("http://host:8000/v1", "gpt", "k")
    with pytest.raises(CliError, match="--endpoint-model"):
        parse_target("https://api.example.com/v1", None, None, epb.EvaluationSpec())
    run = parse_benchmark("mmlu?subject=anatomy", 0, None)
    assert run.benchmark == "benchmarks/mmlu" and dict(run.options) == {"subject": "anatomy"}
    assert parse_benchmark("@quiz/v2", 0, None).dataset_version == "datasets/quiz/versions/v2"
    with pytest.raises(CliError):
        parse_benchmark("gsm8k?oops", 0, None)


@pytest.mark.parametrize(
    "completion",
    [
        "    import socket\n    s = socket.create_connection(('127.0.0.1', 9), timeout=2)\n    return 1\n",
        "    open('/tmp/escaped-by-humaneval', 'w').write('x')\n    return 1\n",
        "    while True:\n        pass\n",
    ],
    ids=["socket", "write-outside", "loop-forever"],
)
def test_humaneval_scores_hostile_code_as_a_failure(completion, tmp_path):
    bench = bm.resolve("humaneval", {"timeout_s": "3"})
    docs = bench.load(bm.DataSource(cache_dir=tmp_path))
    doc = docs.test[0]
    req = bench.build(doc, 0, [], chat=False)
    score = bench.score(doc, req, bm.GenResult(texts=[completion]))
    assert score.metrics["pass@1"] == 0.0
    assert not Path("/tmp/escaped-by-humaneval").exists()
