"""Recipe building blocks on the tiny model: assistant-only labels, truncation reports, padding-free
batches, merge, spec errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from cli.demo_models import build_tiny_model
from services.core.errors import InvalidArgument
from services.training.recipes import data as D
from services.training.recipes.merge import merge_adapter
from services.training.recipes.spec import Hyperparameters, Launcher, parse_spec

CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "Four."}, {"role": "user", "content": "And 3+3?"},
                {"role": "assistant", "content": "Six."}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny)


def test_labels_cover_only_the_assistant_turns_and_their_end_tokens(tokenizer):
    ids, labels = D.tokenize_conversation(tokenizer, CONVERSATION)
    assert len(ids) == len(labels)
    trained = [i for i, lab in zip(ids, labels, strict=True) if lab != D.IGNORE_INDEX]
    assert tokenizer.decode(trained) == "Four.<|im_end|>Six.<|im_end|>"
    assert all(lab in (D.IGNORE_INDEX, i) for i, lab in zip(ids, labels, strict=True))
    prompt_ids = tokenizer.apply_chat_template(CONVERSATION[:2], add_generation_prompt=True, tokenize=True,
                                               return_dict=False)
    assert labels[:len(prompt_ids)] == [D.IGNORE_INDEX] * len(prompt_ids)  # system + user + header: no loss


def test_rows_over_max_length_are_truncated_and_reported_by_row_number(tokenizer, tmp_path):
    rows = [{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]},
            {"messages": [{"role": "user", "content": "word " * 200}, {"role": "assistant", "content": "ok"}]},
            {"messages": [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": "long " * 100}]},
            {"messages": [{"role": "wizard", "content": "?"}]}]
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    logged: list[tuple[str, dict]] = []
    loaded = D.load_rows(path, "datasets/d/versions/v1", "messages", "jsonl", lambda m, **f: logged.append((m, f)))
    data = D.cached_sft(tmp_path / "cache", "ab" * 32, tokenizer, lambda: loaded, 48, lambda m, **f: logged.append((m, f)),
                        "datasets/d/versions/v1")
    assert data.truncated_rows == [2, 3] and data.empty_rows == [2]  # row 2 lost its answer entirely
    assert [len(e["input_ids"]) for e in data.examples] == [len(data.examples[0]["input_ids"]), 48]
    messages = {m: f for m, f in logged}
    assert messages["dataset rows skipped"]["rows"] == [4]
    assert messages["rows truncated to max_length"]["rows"] == [2, 3]
    assert messages["rows without assistant tokens skipped"]["rows"] == [2]
    again = D.cached_sft(tmp_path / "cache", "ab" * 32, tokenizer, lambda: pytest.fail("cache not used"), 48,
                         lambda m, **f: None, "datasets/d/versions/v1")
    assert again == data


def test_padding_free_batch_gives_the_same_logits_as_each_row_alone(tiny, tokenizer):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
    rows = [D.tokenize_conversation(tokenizer, CONVERSATION[i:i + 3]) for i in (0, 2)]
    batch = D.FlatteningCollator()([{"input_ids": i, "labels": lab} for i, lab in rows])
    assert batch["input_ids"].shape == (1, sum(len(i) for i, _ in rows))
    assert batch["position_ids"][0].tolist() == list(range(len(rows[0][0]))) + list(range(len(rows[1][0])))
    with torch.no_grad():
        packed = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False).logits[0]
        alone = torch.cat([model(input_ids=torch.tensor([i])).logits[0] for i, _ in rows])
    assert torch.allclose(packed, alone, atol=1e-5)  # no attention across the row boundary
    bins = D.pack([{"input_ids": i, "labels": lab} for i, lab in rows], max_length=1000)
    assert len(bins) == 1 and torch.equal(D.FlatteningCollator()(bins)["input_ids"], batch["input_ids"])


def test_merged_model_gives_the_logits_of_base_plus_adapter(tiny, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    peft_model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32),
                                LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a trained-looking adapter (B starts at zero)
    peft_model.save_pretrained(tmp_path / "adapter")
    out = merge_adapter(tiny, tmp_path / "adapter", tmp_path / "merged")
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    ids = torch.tensor([[1, 5, 9, 42, 100, 7, 300]])
    with torch.no_grad():
        want = peft_model.eval()(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()(input_ids=ids).logits
        got = merged(input_ids=ids).logits
    assert (want - base).abs().max() > 1e-2  # the adapter changes the output ...
    assert torch.allclose(got, want, atol=1e-4)  # ... and the merged weights carry exactly that change
    assert (out / "tokenizer.json").is_file() and not (out / "adapter_config.json").exists()


def test_merge_rejects_a_folder_without_an_adapter(tiny, tmp_path):
    with pytest.raises(InvalidArgument) as info:
        merge_adapter(tiny, tiny, tmp_path / "out")
    assert info.value.reason == "NOT_AN_ADAPTER"


def test_bad_spec_names_each_field():
    with pytest.raises(InvalidArgument) as info:
        parse_spec({"method": "sft", "base_model": {"name": "m", "artifact_prefix": "p"}, "datasets": [],
                    "hyperparameters": {"lora_rank": 0}, "output": {"model": "models/x"},
                    "s3": {"endpoint": "e", "bucket": "b"}})
    fields = {v.field for v in info.value.violations}
    assert {"spec.method", "spec.datasets", "spec.hyperparameters.lora_rank"} <= fields


def resolved(precision: str = "fp32", **given) -> Hyperparameters:
    return Hyperparameters.resolve(given, method="lora", use_lora=True, precision=precision)


def test_deepspeed_config_follows_the_launcher_spec():
    from services.training.recipes.distributed import deepspeed_config

    hp = resolved(batch_size=3, gradient_accumulation_steps=4, max_grad_norm=0.5)
    z2 = deepspeed_config(Launcher(kind="deepspeed", num_processes=2, zero_stage=2), hp)
    zero = z2["zero_optimization"]
    assert zero["stage"] == 2 and "offload_optimizer" not in zero and "offload_param" not in zero
    assert (z2["train_micro_batch_size_per_gpu"], z2["gradient_accumulation_steps"]) == (3, 4)
    assert z2["train_batch_size"] == 3 * 4 * 2 and z2["gradient_clipping"] == 0.5
    assert z2["bf16"] == z2["fp16"] == {"enabled": False}  # fp32
    assert z2["zero_allow_untested_optimizer"] is True and z2["zero_force_ds_cpu_optimizer"] is False
    z3 = deepspeed_config(Launcher(kind="deepspeed", num_processes=4, zero_stage=3, offload=True,
                                   offload_parameters=True), resolved("bf16", gradient_accumulation_steps=1))
    zero = z3["zero_optimization"]
    assert zero["stage"] == 3 and zero["offload_optimizer"]["device"] == zero["offload_param"]["device"] == "cpu"
    assert zero["stage3_gather_16bit_weights_on_model_save"] is True
    assert z3["train_batch_size"] == 1 * 1 * 4 and z3["bf16"] == {"enabled": True}
    z2_offload = deepspeed_config(Launcher(kind="deepspeed", num_processes=2, zero_stage=2, offload=True,
                                           offload_parameters=True), hp)
    assert "offload_optimizer" in z2_offload["zero_optimization"]
    assert "offload_param" not in z2_offload["zero_optimization"]  # parameter offload is ZeRO-3 only
    z3_optimizer_only = deepspeed_config(Launcher(kind="deepspeed", num_processes=2, zero_stage=3, offload=True), hp)
    assert "offload_optimizer" in z3_optimizer_only["zero_optimization"]
    assert "offload_param" not in z3_optimizer_only["zero_optimization"]  # only when asked for


def test_deepspeed_config_matches_the_trainer_arguments(tmp_path):
    """The Trainer compares every concrete value with its own arguments and fails on a mismatch."""
    from transformers import TrainingArguments

    from services.training.recipes.distributed import deepspeed_config

    config = deepspeed_config(Launcher(kind="deepspeed", num_processes=1, zero_stage=2),
                              resolved(batch_size=2, gradient_accumulation_steps=3, max_grad_norm=0.7))

    def mismatches(accumulation: int) -> list[str]:
        args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, max_grad_norm=0.7,
                                 gradient_accumulation_steps=accumulation, deepspeed=config, report_to=[])
        return args.hf_deepspeed_config.mismatches

    assert mismatches(3) == []
    assert any("gradient_accumulation_steps" in m for m in mismatches(2))  # the check is live
