"""The training itself, in one process (the job's child, or one rank of a launched run).

``train(plan, sink)`` is a straight recipe: tokenizer and data -> model (full / LoRA / DoRA / QLoRA,
or a trl preference trainer) -> Trainer with the reporting and checkpoint callbacks -> train (resuming
from a downloaded checkpoint) -> save the final weights. Downloads, uploads of outputs and registration
happen around it in :mod:`.run`. A vision-language base model takes the SFT path of :mod:`.vision` (its
processor, image rows, frozen vision tower / aligner) and its processor files are saved with the result.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainingArguments, set_seed

from services.core.artifacts import S3ArtifactStore
from services.core.jobs.secrets import s3_settings_for
from services.core.vision import vision_info

from . import data as D
from .callbacks import CheckpointUploader, ReportingCallback, TokenCounter
from .distributed import deepspeed_config
from .events import EventSink
from .spec import TrainingSpec, parse_spec


@dataclass
class DatasetFile:
    name: str
    path: str
    sha256: str
    format: str
    file_type: str | None


@dataclass
class Plan:
    """Everything a training process needs, all local (JSON, handed to launched ranks as a file)."""

    job_name: str
    spec: dict[str, Any]
    base_dir: str
    datasets: list[DatasetFile]
    validation: DatasetFile | None
    workdir: str
    output_dir: str
    resume_from: str | None = None

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, text: str) -> Plan:
        doc = json.loads(text)
        doc["datasets"] = [DatasetFile(**d) for d in doc["datasets"]]
        doc["validation"] = DatasetFile(**doc["validation"]) if doc["validation"] else None
        return cls(**doc)


@dataclass
class TrainResult:
    global_step: int
    cancelled: bool
    final_metrics: dict[str, float]


def is_vision_model(base_dir: str) -> bool:
    return vision_info(Path(base_dir)) is not None


# --------------------------------------------------------------------------- trainers


class _CountsTokens:
    """Counts the non-padding tokens each training step consumes (for tokens_per_s)."""

    token_counter: TokenCounter

    def training_step(self, model: Any, inputs: dict[str, Any], num_items_in_batch: Any = None) -> torch.Tensor:
        masks = [v for k, v in inputs.items() if k.endswith("attention_mask") and torch.is_tensor(v)]
        if masks:
            self.token_counter.tokens += int(sum(m.sum().item() for m in masks))
        elif torch.is_tensor(inputs.get("input_ids")):
            self.token_counter.tokens += inputs["input_ids"].numel()
        return super().training_step(model, inputs, num_items_in_batch)  # type: ignore[misc]


class SftTrainer(_CountsTokens, Trainer):
    """Trainer on padding-free batches whose LM head runs only where a label is (assistant tokens):
    the hidden states of the other positions never reach the vocabulary projection."""

    def compute_loss(self, model: Any, inputs: dict[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Any:
        labels = inputs["labels"]
        targets = labels[:, 1:]
        keep = (targets[0] != D.IGNORE_INDEX).nonzero().squeeze(-1)
        # use_cache=False: with no cache and no attention mask, the position ids delimit the rows (block-causal)
        outputs = model(**{k: v for k, v in inputs.items() if k != "labels"}, logits_to_keep=keep, use_cache=False)
        loss = F.cross_entropy(outputs.logits[0].float(), targets[0, keep], reduction="sum")
        if num_items_in_batch is not None:
            loss = loss / num_items_in_batch
            if self.args.average_tokens_across_devices and self.accelerator.num_processes > 1:
                loss = loss * self.accelerator.num_processes  # gradients are averaged over the ranks
        else:
            loss = loss / max(keep.numel(), 1)
        return (loss, outputs) if return_outputs else loss


def _with_counter(cls: type) -> type:
    return type(f"Counted{cls.__name__}", (_CountsTokens, cls), {})


# --------------------------------------------------------------------------- model and arguments


def _peft_config(spec: TrainingSpec) -> Any:
    from peft import LoraConfig

    hp = spec.hyperparameters
    return LoraConfig(r=hp.lora_rank, lora_alpha=hp.lora_alpha, lora_dropout=hp.lora_dropout,
                      target_modules=hp.lora_target_modules, use_dora=spec.method == "dora", task_type="CAUSAL_LM")


def _load_model(spec: TrainingSpec, base_dir: str) -> Any:
    if spec.method != "qlora":
        return AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig

    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=quant, dtype=compute,
                                                 device_map={"": torch.cuda.current_device()})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)


def _common_args(spec: TrainingSpec, plan: Plan, has_eval: bool, distributed: bool) -> dict[str, Any]:
    hp = spec.hyperparameters
    cuda = torch.cuda.is_available()
    args: dict[str, Any] = dict(
        output_dir=str(Path(plan.workdir) / "trainer"),
        per_device_train_batch_size=hp.batch_size, per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps, learning_rate=hp.learning_rate,
        lr_scheduler_type=hp.lr_scheduler, warmup_steps=hp.warmup_ratio if hp.warmup_ratio < 1 else 0,
        num_train_epochs=hp.num_epochs, max_steps=hp.max_steps, seed=hp.seed, weight_decay=hp.weight_decay,
        max_grad_norm=hp.max_grad_norm, logging_steps=spec.log_every_steps, logging_first_step=True,
        save_strategy="steps" if spec.checkpoint_every_steps else "no",
        save_steps=spec.checkpoint_every_steps or 500, save_total_limit=2,
        eval_strategy="steps" if has_eval and spec.eval_every_steps else "no",
        eval_steps=spec.eval_every_steps or None, prediction_loss_only=True,
        bf16=hp.precision == "bf16", fp16=hp.precision == "fp16", use_cpu=not cuda,
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
        gradient_checkpointing=hp.gradient_checkpointing or spec.method == "qlora",
        gradient_checkpointing_kwargs={"use_reentrant": False},
    )
    if spec.launcher.kind == "deepspeed":  # always a launched rank (see run.py)
        args["deepspeed"] = deepspeed_config(spec.launcher, hp)
        if not cuda:
            args["use_cpu"] = False  # use_cpu would make the ranks plain DDP and drop the DeepSpeed config
            args["accelerator_config"] = {"use_configured_state": True}
            _deepspeed_state_on_cpu()
    elif distributed:
        args["ddp_backend"] = "nccl" if cuda else "gloo"
    return args


def _deepspeed_state_on_cpu() -> None:
    """Set up the ranks' accelerate state for DeepSpeed on a node without CUDA, before any TrainingArguments.

    accelerate 1.15 picks no process-group backend for DeepSpeed when there is no accelerator device, and then
    counts one process per rank (every rank trains on all the data and acts as the main one); given the CPU
    accelerator's backend (gloo without oneCCL) it sets up a real DEEPSPEED state over the WORLD_SIZE ranks.
    DeepSpeed's shared-memory all-reduce op (a C++ JIT build; it serves only tensor-parallel inference) is
    switched off, so a ZeRO run compiles nothing."""
    import deepspeed.ops
    from accelerate import PartialState
    from deepspeed.accelerator import get_accelerator

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False  # deepspeed keeps edits to this dict
    os.environ["ACCELERATE_USE_DEEPSPEED"] = "true"  # as `accelerate launch` sets it for DeepSpeed ranks
    PartialState(backend=get_accelerator().communication_backend_name())


def describe_engine(trainer: Trainer, world_size: int) -> str:
    """Which engine trains, e.g. ``deepspeed zero-2 over gloo, 2 ranks`` or ``ddp over gloo, 2 ranks``."""
    import torch.distributed as dist

    backend = dist.get_backend() if dist.is_initialized() else "none"
    if trainer.is_deepspeed_enabled:
        stage = trainer.accelerator.state.deepspeed_plugin.zero_stage
        return f"deepspeed zero-{stage} over {backend}, {world_size} ranks"
    return f"ddp over {backend}, {world_size} ranks" if world_size > 1 else "single process"


# --------------------------------------------------------------------------- recipes


def _load_all(plan: Plan, spec: TrainingSpec, sink: EventSink) -> tuple[list[D.Rows], D.Rows | None]:
    train_rows = [D.load_rows(Path(d.path), d.name, d.format, d.file_type, sink.log) for d in plan.datasets]
    val_rows = None
    if plan.validation is not None:
        v = plan.validation
        val_rows = D.load_rows(Path(v.path), v.name, v.format, v.file_type, sink.log)
    return train_rows, val_rows


def _sft_trainer(plan: Plan, spec: TrainingSpec, sink: EventSink, tokenizer: Any, args: dict[str, Any],
                 counter: TokenCounter) -> tuple[Trainer, bool]:
    hp = spec.hyperparameters
    cache = Path(plan.workdir) / "cache"
    examples: list[dict] = []
    val_examples: list[dict] = []
    for d in plan.datasets:
        def rows(d: DatasetFile = d) -> D.Rows:
            return D.load_rows(Path(d.path), d.name, d.format, d.file_type, sink.log)

        tokenized = D.cached_sft(cache, d.sha256, tokenizer, rows, hp.max_length, sink.log, d.name)
        train_part, held = D.split_validation(tokenized.examples, spec.validation_split, hp.seed)
        examples += train_part
        val_examples += held
    if plan.validation is not None:
        v = plan.validation

        def vrows() -> D.Rows:
            return D.load_rows(Path(v.path), v.name, v.format, v.file_type, sink.log)

        val_examples += D.cached_sft(cache, v.sha256, tokenizer, vrows, hp.max_length, sink.log, v.name).examples
    if hp.packing:
        train_set: list[dict] = D.pack(examples, hp.max_length)
        sink.log("rows packed", rows=len(examples), sequences=len(train_set), max_length=hp.max_length)
    else:
        train_set = examples
    model = _load_model(spec, plan.base_dir)
    if spec.trains_adapter:
        from peft import get_peft_model

        model = get_peft_model(model, _peft_config(spec))
    trainer = SftTrainer(model=model, args=TrainingArguments(**args), train_dataset=train_set,
                         eval_dataset=val_examples or None, data_collator=D.FlatteningCollator(),
                         processing_class=tokenizer)
    trainer.token_counter = counter
    return trainer, bool(val_examples)


def _preference_trainer(plan: Plan, spec: TrainingSpec, sink: EventSink, tokenizer: Any, args: dict[str, Any],
                        counter: TokenCounter) -> tuple[Trainer, bool]:
    from datasets import Dataset

    hp = spec.hyperparameters
    train_rows, val_rows = _load_all(plan, spec, sink)
    records: list[dict] = []
    val_records: list[dict] = []
    for rows in train_rows:
        recs = D.preference_records(rows, spec.method)
        D.report_long_preference_rows(tokenizer, rows, recs, hp.max_length, sink.log)
        train_part, held = D.split_validation(recs, spec.validation_split, hp.seed)
        records += train_part
        val_records += held
    if val_rows is not None:
        val_records += D.preference_records(val_rows, spec.method)
    args = {**args, "max_length": hp.max_length, "beta": hp.beta}
    if spec.method == "dpo":
        from trl import DPOConfig as Config
        from trl import DPOTrainer as Cls
    elif spec.method == "kto":
        from trl import KTOConfig as Config
        from trl import KTOTrainer as Cls
    elif spec.method == "orpo":
        from trl.experimental.orpo import ORPOConfig as Config
        from trl.experimental.orpo import ORPOTrainer as Cls
    else:  # simpo and cpo: trl's CPOTrainer (SimPO = loss_type "simpo" without the NLL term)
        from trl.experimental.cpo import CPOConfig as Config
        from trl.experimental.cpo import CPOTrainer as Cls

        if spec.method == "simpo":
            args.update(loss_type="simpo", cpo_alpha=0.0, simpo_gamma=hp.simpo_gamma)
    model = AutoModelForCausalLM.from_pretrained(plan.base_dir, dtype=torch.float32)
    trainer = _with_counter(Cls)(
        model=model, args=Config(**args), train_dataset=Dataset.from_list(records),
        eval_dataset=Dataset.from_list(val_records) if val_records else None, processing_class=tokenizer,
        peft_config=_peft_config(spec) if spec.use_lora else None)
    trainer.token_counter = counter
    return trainer, bool(val_records)


def train(plan: Plan, sink: EventSink, *, rank: int = 0, world_size: int = 1) -> TrainResult:
    """Train per ``plan``; rank 0 uploads checkpoints and saves the final weights to ``plan.output_dir``."""
    spec = parse_spec(plan.spec)
    distributed = world_size > 1
    is_main = rank == 0
    set_seed(spec.hyperparameters.seed)
    tokenizer = AutoTokenizer.from_pretrained(plan.base_dir)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    has_eval = plan.validation is not None or spec.validation_split > 0
    args = _common_args(spec, plan, has_eval, distributed)
    counter = TokenCounter()
    vision = is_vision_model(plan.base_dir)
    if vision:  # a vision-language model: its processor, image rows, frozen parts (see .vision)
        from .vision import vision_sft_trainer

        trainer, has_eval, processor = vision_sft_trainer(plan, spec, sink, args, counter)
        tokenizer = processor.tokenizer
    else:
        build = _preference_trainer if spec.is_preference else _sft_trainer
        trainer, has_eval = build(plan, spec, sink, tokenizer, args, counter)
    if not has_eval:
        trainer.args.eval_strategy = "no"
    store = S3ArtifactStore.connect(s3_settings_for(plan.spec["s3"])) if is_main else None
    trainer.add_callback(CheckpointUploader(store, plan.job_name, sink, spec.checkpoint_every_steps,
                                            is_main=is_main, distributed=distributed))
    reporting = ReportingCallback(sink, counter, distributed=distributed, scale=world_size)
    trainer.add_callback(reporting)  # after the uploader: a cancel also clears its end-of-run save
    if is_main and world_size > 1:
        sink.log("training engine", engine=describe_engine(trainer, world_size))
    if plan.resume_from:
        sink.log("resuming from checkpoint", checkpoint=Path(plan.resume_from).name)
    output = trainer.train(resume_from_checkpoint=plan.resume_from)
    if is_main and trainer.is_deepspeed_enabled:
        engine = trainer.model_wrapped
        # this rank's fp32 master partition (ZeRO-3, else ZeRO-1/2): ~1/world_size of the trainable weights
        zero = engine.optimizer
        flat = getattr(zero, "fp32_partitioned_groups_flat", None) or zero.single_partition_of_fp32_groups
        partition = sum(t.numel() for t in flat)
        sink.log("deepspeed engine used", zero_stage=engine.zero_optimization_stage(), world_size=engine.world_size,
                 offload=spec.launcher.offload, optimizer_partition_params=partition,
                 trainable_params=sum(getattr(p, "ds_numel", p.numel())  # ZeRO-3 leaves each rank a stub
                                      for p in trainer.model.parameters() if p.requires_grad))
    step = trainer.state.global_step
    if reporting.stopped_by_cancel:
        return TrainResult(step, True, {})
    # train_tokens: non-padding tokens trained on (rank 0's count times the ranks), OpenAI's trained_tokens
    metrics = {"train_loss": float(output.training_loss), "global_step": float(step),
               "train_tokens": float(counter.tokens * world_size)}
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    if losses:
        metrics["final_loss"] = float(losses[-1])
    if has_eval:
        metrics.update({k: float(v) for k, v in trainer.evaluate().items()
                        if k == "eval_loss" and isinstance(v, float) and math.isfinite(v)})
    trainer.save_model(plan.output_dir)  # the adapter for PEFT models, the full weights otherwise
    if is_main:
        tokenizer.save_pretrained(plan.output_dir)
        if vision:
            from .vision import save_processor_files

            save_processor_files(plan.base_dir, plan.output_dir)
        sink.log("training finished", step=step, **metrics)
    return TrainResult(step, False, metrics)
