"""The memory estimate against a measured peak (a real training step in a child process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from services.training.memory import GIB, MemoryRequest, ModelShape, estimate_memory, lora_parameters

CONFIG = dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
              intermediate_size=512, vocab_size=8000)

MEASURE = textwrap.dedent("""
    import json, resource, sys
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM
    cfg, batch, length = json.loads(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    ids = torch.randint(0, cfg["vocab_size"], (batch, length))
    def rss():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    # Warm up on a minute model first: lazy imports (transformers integrations, DeepSpeed when
    # installed) and allocator set-up are runtime overhead, not part of the estimate measured here.
    small = Qwen2ForCausalLM(Qwen2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, intermediate_size=32, vocab_size=64,
                                         attn_implementation="eager"))
    tiny_ids = torch.randint(0, 64, (1, 8))
    small_opt = torch.optim.AdamW(small.parameters(), lr=1e-4)
    small(input_ids=tiny_ids, labels=tiny_ids).loss.backward()
    small_opt.step()
    del small, small_opt
    base = rss()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**cfg, attn_implementation="eager"))
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    for _ in range(1):
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    # VmHWM belongs to this process image; ru_maxrss would carry the parent's RSS over fork + exec.
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
    print(json.dumps({"measured": peak - base, "params": params}))
""")


def _measure(batch: int, length: int) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", MEASURE, json.dumps(CONFIG), str(batch), str(length)],
                         capture_output=True, text=True, env=env, timeout=120, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_full_finetune_estimate_is_within_a_generous_factor_of_the_measured_peak():
    got = _measure(batch=4, length=128)
    shape = ModelShape.from_config(CONFIG, got["params"])
    est = estimate_memory(shape, MemoryRequest(method="full", use_lora=False, precision="fp32", batch_size=4,
                                               max_length=128, gradient_checkpointing=False))
    without_runtime = est.total - est.overhead  # the measured delta excludes the interpreter and torch itself
    assert 0.5 * got["measured"] <= without_runtime <= 2 * got["measured"], (est.describe(), got)


def test_lora_trainable_count_matches_peft_all_linear():
    from peft import LoraConfig, get_peft_model
    from transformers import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config(**{**CONFIG, "num_hidden_layers": 1, "vocab_size": 300}))
    params = sum(p.numel() for p in model.parameters())
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=32, target_modules="all-linear"))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    shape = ModelShape.from_config({**CONFIG, "num_hidden_layers": 1, "vocab_size": 300}, params)
    assert lora_parameters(shape, 8) == trainable


def test_zero_partitions_optimizer_gradients_and_weights_across_processes():
    shape = ModelShape.from_config(CONFIG, 10_000_000)
    common = dict(method="full", use_lora=False, precision="bf16", batch_size=1, max_length=128, accelerator="cuda")
    ddp = estimate_memory(shape, MemoryRequest(**common, num_processes=4))
    z2 = estimate_memory(shape, MemoryRequest(**common, num_processes=4, zero_stage=2))
    z3 = estimate_memory(shape, MemoryRequest(**common, num_processes=4, zero_stage=3))
    assert z2.optimizer == ddp.optimizer // 4 and z2.gradients == ddp.gradients // 4 and z2.weights == ddp.weights
    assert z3.weights == ddp.weights // 4
    offloaded = estimate_memory(shape, MemoryRequest(**common, num_processes=4, zero_stage=2, offload_optimizer=True))
    assert offloaded.optimizer == 0


def test_qlora_base_is_a_quarter_of_bf16_and_lora_trains_few_parameters():
    shape = ModelShape.from_config({"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32,
                                    "intermediate_size": 11008, "vocab_size": 32000}, 6_740_000_000)
    common = dict(precision="bf16", batch_size=1, max_length=2048, accelerator="cuda")
    full = estimate_memory(shape, MemoryRequest(method="full", use_lora=False, **common))
    lora = estimate_memory(shape, MemoryRequest(method="lora", use_lora=True, **common))
    qlora = estimate_memory(shape, MemoryRequest(method="qlora", use_lora=True, **common))
    assert full.total > 70 * GIB > lora.total > qlora.total
    assert lora.trainable_parameters < shape.parameter_count // 100
    assert qlora.weights < lora.weights / 3
