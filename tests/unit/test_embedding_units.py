"""Units of the embedding engine (services/inference/engines/embedding.py) and of the registry's task
inspection: pooling modes on hand-computed tensors, the ``dimensions`` rules, and what a folder declares."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from services.inference.engines.embedding import (
    EmbeddingModelError,
    EmbeddingRequestError,
    fit_dimensions,
    is_embedding_model,
    pool,
    read_config,
)
from services.registry.inspection import ModelMetadata, _inspect_task

# two sequences of 3 positions, 2 features; row 0 right-padded (2 tokens), row 1 left-padded (2 tokens)
HIDDEN = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[100.0, 100.0], [5.0, 6.0], [7.0, 10.0]]])
MASK = torch.tensor([[1, 1, 0], [0, 1, 1]])


@pytest.mark.parametrize(
    ("mode", "expected"),
    [
        ("cls", [[1.0, 2.0], [5.0, 6.0]]),  # the first real token, after left padding too
        ("lasttoken", [[3.0, 4.0], [7.0, 10.0]]),
        ("mean", [[2.0, 3.0], [6.0, 8.0]]),
        ("max", [[3.0, 4.0], [7.0, 10.0]]),
        ("mean_sqrt_len_tokens", [[4.0 / 2**0.5, 6.0 / 2**0.5], [12.0 / 2**0.5, 16.0 / 2**0.5]]),
        (
            "weightedmean",
            [[(1 + 6) / 3, (2 + 8) / 3], [(5 + 14) / 3, (6 + 20) / 3]],
        ),  # weights 1, 2 from the first token
    ],
)
def test_each_pooling_mode_ignores_padding(mode, expected):
    assert torch.allclose(pool(HIDDEN, MASK, (mode,)), torch.tensor(expected))


def test_several_pooling_modes_are_concatenated_in_order():
    out = pool(HIDDEN, MASK, ("cls", "mean"))
    assert out.tolist() == [[1.0, 2.0, 2.0, 3.0], [5.0, 6.0, 6.0, 8.0]]


def test_dimensions_of_a_model_without_matryoshka_must_be_its_size():
    v = torch.nn.functional.normalize(torch.randn(2, 8), dim=-1)
    assert fit_dimensions(v, None, full=8, normalize=True, matryoshka=None) is v
    assert fit_dimensions(v, 8, full=8, normalize=True, matryoshka=None) is v
    with pytest.raises(EmbeddingRequestError) as err:
        fit_dimensions(v, 4, full=8, normalize=True, matryoshka=None)
    assert err.value.param == "dimensions" and "Matryoshka" in str(err.value)


def test_matryoshka_dimensions_truncate_and_renormalise():
    v = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    cut = fit_dimensions(v, 4, full=8, normalize=True, matryoshka=(2, 4))
    assert cut.shape == (3, 4) and torch.allclose(cut.norm(dim=-1), torch.ones(3))
    assert torch.allclose(cut, torch.nn.functional.normalize(v[:, :4], dim=-1))
    assert torch.equal(fit_dimensions(v, 4, full=8, normalize=False, matryoshka=()), v[:, :4])  # any size
    for bad, allowed in ((3, (2, 4)), (9, ()), (0, ())):
        with pytest.raises(EmbeddingRequestError) as err:
            fit_dimensions(v, bad, full=8, normalize=True, matryoshka=allowed)
        assert err.value.param == "dimensions"


def _folder(tmp_path: Path, modules: list[dict] | None, files: dict[str, dict]) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    if modules is not None:
        (tmp_path / "modules.json").write_text(json.dumps(modules))
    for rel, doc in files.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(json.dumps(doc))
    return tmp_path


ST = "sentence_transformers.models."
STANDARD = [
    {"idx": 0, "name": "0", "path": "", "type": ST + "Transformer"},
    {"idx": 1, "name": "1", "path": "1_Pooling", "type": ST + "Pooling"},
]


def test_a_sentence_transformers_folder_is_read(tmp_path):
    folder = _folder(
        tmp_path,
        [*STANDARD, {"idx": 2, "name": "2", "path": "2_Normalize", "type": ST + "Normalize"}],
        {
            "1_Pooling/config.json": {
                "word_embedding_dimension": 4,
                "pooling_mode_cls_token": True,
                "pooling_mode_mean_tokens": False,
            },
            "sentence_bert_config.json": {"max_seq_length": 128, "do_lower_case": True},
            "config_sentence_transformers.json": {"prompts": {"query": "query: "}, "default_prompt_name": "query"},
            "config.json": {"architectures": ["BertModel"], "matryoshka_dimensions": [4, 2]},
        },
    )
    cfg = read_config(folder)
    assert (cfg.pooling, cfg.normalize, cfg.max_seq_length, cfg.do_lower_case, cfg.prompt, cfg.matryoshka) == (
        ("cls",),
        True,
        128,
        True,
        "query: ",
        (2, 4),
    )
    assert is_embedding_model(folder)


def test_new_pooling_keys_and_no_normalize(tmp_path):
    folder = _folder(
        tmp_path,
        STANDARD,
        {"1_Pooling/config.json": {"pooling_mode": ["mean", "max"]}, "config.json": {"is_matryoshka": True}},
    )
    cfg = read_config(folder)
    assert cfg.pooling == ("mean", "max") and not cfg.normalize and cfg.matryoshka == ()


@pytest.mark.parametrize(
    ("modules", "pooling", "needle"),
    [
        ([*STANDARD, {"path": "2_X", "type": ST + "LayerNorm"}], {"pooling_mode": "mean"}, "not supported"),
        (STANDARD, {"pooling_mode": "median"}, "unknown pooling mode"),
        (STANDARD, {"pooling_mode_mean_tokens": False}, "no pooling mode"),
        (STANDARD[:1], {}, "Pooling module"),
    ],
)
def test_pipelines_the_engine_cannot_run_are_refused(tmp_path, modules, pooling, needle):
    folder = _folder(tmp_path, modules, {"1_Pooling/config.json": pooling})
    with pytest.raises(EmbeddingModelError, match=needle):
        read_config(folder)


def test_bare_encoders_are_embedding_models_and_causal_lms_are_not(tmp_path):
    assert is_embedding_model(_folder(tmp_path / "a", None, {"config.json": {"architectures": ["XLMRobertaModel"]}}))
    assert read_config(tmp_path / "a").pooling == ("mean",)  # sentence-transformers' default for a bare model
    assert not is_embedding_model(
        _folder(tmp_path / "b", None, {"config.json": {"architectures": ["LlamaForCausalLM"]}})
    )
    assert not is_embedding_model(_folder(tmp_path / "c", None, {"config.json": {}}))


def test_the_registry_records_the_task(tmp_path):
    meta = ModelMetadata(context_length=512)
    folder = _folder(
        tmp_path / "st",
        STANDARD,
        {
            "1_Pooling/config.json": {"word_embedding_dimension": 384, "pooling_mode_mean_tokens": True},
            "sentence_bert_config.json": {"max_seq_length": 256},
        },
    )
    _inspect_task(folder, {"architectures": ["BertModel"], "hidden_size": 384}, meta)
    assert (meta.task, meta.embedding_dimensions, meta.context_length) == ("embedding", 384, 256)
    causal = ModelMetadata()
    _inspect_task(tmp_path, {"architectures": ["Qwen2ForCausalLM"], "hidden_size": 64}, causal)
    assert (causal.task, causal.embedding_dimensions) == ("text-generation", 0)
    dense = ModelMetadata()
    folder = _folder(
        tmp_path / "dense",
        [*STANDARD, {"path": "2_Dense", "type": ST + "Dense"}],
        {
            "1_Pooling/config.json": {"pooling_mode": ["cls", "mean"], "embedding_dimension": 8},
            "2_Dense/config.json": {"in_features": 16, "out_features": 4},
        },
    )
    _inspect_task(folder, {"architectures": ["BertModel"], "hidden_size": 8}, dense)
    assert dense.embedding_dimensions == 4
