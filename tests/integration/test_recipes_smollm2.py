"""The headline: LoRA SFT of SmolLM2-135M-Instruct as a real job teaches it a task it gets wrong
("Shout this word: apple" -> "[APPLE]!"), measured on held-out words."""

from __future__ import annotations

import json

import pytest
import torch

from cli.demo_models import build_smollm2
from services.core.jobs import Worker
from services.training.recipes.data import IGNORE_INDEX, tokenize_conversation
from tests.integration.test_recipes import (  # noqa: F401
    DATA,
    FAST,
    KINDS,
    events_of,
    job_env,
    jobs,
    make_spec,
    run_job,
    store,
    upload_dataset,
    upload_model,
)


def _answer_logprob(model, tokenizer, messages: list[dict]) -> float:
    """Mean log-probability per token of the assistant answer given the prompt."""
    ids, labels = tokenize_conversation(tokenizer, messages)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits[0, :-1]
    targets = torch.tensor(labels[1:])
    keep = targets != IGNORE_INDEX
    logp = torch.log_softmax(logits.float(), -1)[keep].gather(1, targets[keep][:, None])
    return logp.mean().item()


def _exact(model, tokenizer, messages: list[dict]) -> bool:
    prompt = tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True, return_tensors="pt",
                                           return_dict=True)
    out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
    answer = tokenizer.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    return answer == messages[-1]["content"]


@pytest.mark.slow  # about 5 minutes on 2 busy cores (SmolLM2 fp32 upload, download, 40 steps)
async def test_lora_sft_teaches_smollm2_the_shout_task(jobs, store, s3_settings, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    smollm2 = build_smollm2()
    base = upload_model(store, smollm2, "models/smollm2/versions/v1")
    spec = make_spec(s3_settings, base, [upload_dataset(store, DATA / "shout_train.jsonl", "messages")],
                     hyperparameters={"max_steps": 40, "batch_size": 4, "learning_rate": 1e-3, "max_length": 96,
                                      "lora_rank": 8, "lora_alpha": 32, "warmup_ratio": 0.05},
                     log_every_steps=5)
    worker = Worker(jobs, KINDS, "w1", tmp_path / "work", child_env=job_env(s3_settings), **FAST)
    done = await run_job(jobs, worker, spec, "trainingJobs/smollm2-shout")

    losses = [e.data["loss"] for e in events_of(jobs, done.name, "metrics") if "loss" in e.data]
    assert losses[-1] < 0.5 * losses[0], losses
    store.download_dir(done.outputs["adapter_prefix"], tmp_path / "adapter")
    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32).eval()
    held_out = [json.loads(line)["messages"] for line in (DATA / "shout_heldout.jsonl").read_text().splitlines()]
    base_lp = [_answer_logprob(model, tokenizer, m) for m in held_out]
    base_exact = sum(_exact(model, tokenizer, m) for m in held_out[:8])
    tuned = PeftModel.from_pretrained(model, tmp_path / "adapter").eval()
    tuned_lp = [_answer_logprob(tuned, tokenizer, m) for m in held_out]
    tuned_exact = sum(_exact(tuned, tokenizer, m) for m in held_out[:8])
    base_mean, tuned_mean = sum(base_lp) / len(base_lp), sum(tuned_lp) / len(tuned_lp)
    print(f"held-out mean answer log-prob: base {base_mean:.3f} tuned {tuned_mean:.3f}; "
          f"exact match of 8: base {base_exact} tuned {tuned_exact}")
    assert tuned_mean > base_mean + 1.0  # e^1: the reference answers became clearly more likely
    assert sum(t > b for t, b in zip(tuned_lp, base_lp, strict=True)) >= 0.9 * len(held_out)
    assert tuned_exact >= base_exact + 4
