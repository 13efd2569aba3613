"""The pipeline document: parsing, every check a malformed file gets, reference resolution, resource ids."""

from __future__ import annotations

import pytest

from modelyard.training.v1 import training_pb2 as tpb
from services.core.errors import InvalidArgument
from services.pipeline import document as D
from services.pipeline.runner import resource_id

DOC = """
name: t
params: {model_dir: null, steps: 10, lr: 1e-3, engine: transformers}
steps:
  - {id: base, type: import, source: "${params.model_dir}/model", model: m}
  - {id: data, type: dataset, path: d.jsonl, dataset: d}
  - id: sft
    type: sft
    model: ${steps.base.model_version}
    datasets: ["${steps.data.dataset_version}"]
    merge: true
    hyperparameters: {max_steps: "${params.steps}", learning_rate: "${params.lr}", precision: bf16}
  - {id: serve, type: deploy, model: "${steps.sft.merged_model_version}", engine: "${params.engine}"}
  - id: eval
    type: eval
    targets: {base: "${steps.base.model_version}", tuned: "${steps.sft.merged_model_version}"}
    benchmarks: [bbh_mc:boolean_expressions]
"""


def violations(source: str, params: dict | None = None) -> dict[str, str]:
    with pytest.raises(InvalidArgument) as info:
        D.parse(source, params)
    return {v.field: v.description for v in info.value.violations}


def test_a_valid_document_parses_with_params_substituted_and_typed():
    doc = D.parse(DOC, {"model_dir": "/m"})
    assert [s.id for s in doc.steps] == ["base", "data", "sft", "serve", "eval"]
    assert doc.params == {"model_dir": "/m", "steps": "10", "lr": "1e-3", "engine": "transformers"}
    spec = D.training_spec(doc.step("sft"), resolved=False)
    assert spec.hyperparameters.max_steps == 10 and spec.merge_adapter
    assert spec.method == tpb.TRAINING_METHOD_LORA and spec.hyperparameters.precision == tpb.PRECISION_BF16


def test_every_problem_is_reported_at_once_naming_step_and_field():
    bad = (DOC.replace("learning_rate", "learnin_rate").replace("type: deploy", "type: deplo")
           .replace("${steps.sft.merged_model_version}\"}", "${steps.sft.adapter}\"}")
           .replace("id: data", "id: base"))  # fmt: skip
    v = violations(bad, {"model_dir": "/m", "nope": "1"})
    assert v["steps.sft.hyperparameters.learnin_rate"] == "unknown field"
    assert "must be one of" in v["steps.serve.type"]
    assert "outputs model_version, merged_model_version, job" in v["steps.eval.targets.tuned"]
    assert "duplicate step id" in v["steps.base.id"]
    assert "not declared" in v["params.nope"]


@pytest.mark.parametrize(("source", "field", "text"), [
    ("steps: [", "source", "line 1"),
    ("- a", "source", "mapping"),
    ("stepz: []", "stepz", "unknown top-level key"),
    ("steps: []", "steps", "non-empty"),
    ("steps: [{id: A, type: import}]", "steps[0].id", "lowercase"),
    ("steps: [{id: a, type: import, model: m}]", "steps.a.source", "required"),
    ("steps: [{id: a, type: import, source: /x, model: m, extra: 1}]", "steps.a.extra", "Extra inputs"),
    ("steps: [{id: a, type: model, version: '${steps.b.model_version}'}]", "steps.a.version", "no earlier step"),
    ("steps: [{id: a, type: model, version: '${params.x}'}]", "steps.a.version", "no parameter"),
    ("steps: [{id: a, type: model, version: '${oops'}]", "steps.a.version", "malformed"),
    ("steps: [{id: a, type: dataset, path: x, version: y}]", "steps.a.path", "exactly one"),
    ("steps: [{id: a, type: quantize, model: m/v1, method: int9}]", "steps.a.method", "w8a8"),
    ("steps: [{id: a, type: sft, model: m/v1, datasets: [d/v1], method: dpo}]", "steps.a.method", "sft takes"),
    ("steps: [{id: a, type: sft, model: m/v1, datasets: [d/v1], hyperparameters: {max_steps: many}}]",
     "steps.a.hyperparameters.max_steps", ""),
    ("steps: [{id: a, type: eval, targets: {x: m/v1}, benchmarks: [b, b]}]", "steps.a.benchmarks", "twice"),
    ("steps: [{id: a, type: deploy, model: m/v1, name: Bad_Name}]", "steps.a.name", "lowercase"),
    ("steps: [{id: a, type: chat, deployment: deployments/x, prompt: hi, max_tokens: 0}]", "steps.a.max_tokens",
     "greater"),
])  # fmt: skip
def test_malformed_documents(source, field, text):
    v = violations(source)
    assert field in v, v
    assert text in v[field]


def test_resolve_keeps_the_type_of_a_whole_reference_and_interpolates_inside_strings():
    doc = D.parse(DOC, {"model_dir": "/m"})
    raw = doc.raw_steps[2]
    outputs = {"base": {"model_version": "models/m/versions/v1"}, "data": {"dataset_version": "datasets/d/versions/v1"}}
    step = D.resolve(raw, outputs, doc.params)
    assert step.model == "models/m/versions/v1" and step.datasets == ["datasets/d/versions/v1"]
    assert step.hyperparameters["max_steps"] == 10 and step.hyperparameters["learning_rate"] == 1e-3
    assert D.resolve(doc.raw_steps[0], {}, doc.params).source == "/m/model"
    with pytest.raises(InvalidArgument, match="produced no 'merged_model_version'"):
        D.resolve(doc.raw_steps[3], {"sft": {"model_version": "models/a/versions/v1"}}, doc.params)


def test_resource_ids_are_valid_and_bounded():
    assert resource_id("run-1", "sft", "") == "run-1-sft"
    assert resource_id("Run_1", "eval", "tuned.v2") == "run-1-eval-tuned-v2"
    long = resource_id("r" * 48, "step-with-a-long-id", "label-that-is-long-too")
    assert len(long) <= 63 and long[-9] == "-"
    assert long != resource_id("r" * 48, "step-with-a-long-id", "label-that-is-long-to0")
