"""Peak-memory estimate of a training job, per device (per process), before any compute.

The estimate adds, per process: weights (4-bit for QLoRA), gradients and AdamW states of the
trainable parameters (LoRA adapters or all weights; ZeRO partitions them across processes),
a reference model for full-weight DPO/KTO, activations (per-layer inputs only with gradient
checkpointing, the Korthikanti et al. per-layer formula otherwise), the logits and their
gradient in fp32, and a fixed runtime overhead. It is deliberately on the high side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

GIB = 1024**3
PAIRED_METHODS = frozenset({"dpo", "orpo", "simpo", "cpo", "kto"})  # two sequences per sample (KTO: KL batch)
REFERENCE_METHODS = frozenset({"dpo", "kto"})  # need a frozen reference model
RUNTIME_OVERHEAD = {"cuda": 1 * GIB, "npu": 1 * GIB, "mps": GIB // 2, "cpu": GIB // 2}


@dataclass(frozen=True)
class ModelShape:
    """What the estimate needs to know about the base model."""

    parameter_count: int
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    intermediate_size: int
    vocab_size: int

    @classmethod
    def from_config(cls, config: dict[str, Any], parameter_count: int) -> ModelShape:
        """From a Hugging Face ``config.json``; missing fields get llama-like guesses from the size."""
        text = config.get("text_config") or config
        hidden = int(text.get("hidden_size") or text.get("n_embd") or guess_hidden(parameter_count))
        layers = int(text.get("num_hidden_layers") or text.get("n_layer") or max(1, parameter_count // (12 * hidden**2)))
        heads = int(text.get("num_attention_heads") or text.get("n_head") or max(1, hidden // 128))
        return cls(
            parameter_count=parameter_count,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            intermediate_size=int(text.get("intermediate_size") or text.get("n_inner") or 4 * hidden),
            vocab_size=int(text.get("vocab_size") or 32000),
        )


def guess_hidden(parameter_count: int) -> int:
    """Hidden size of a llama-like model of that many parameters (params ~ 12 * layers * h^2, layers ~ h / 128)."""
    return max(64, int(round((parameter_count * 128 / 12) ** (1 / 3) / 64)) * 64)


@dataclass(frozen=True)
class MemoryRequest:
    """The parts of a job spec that drive memory."""

    method: str  # full | lora | qlora | dora | dpo | orpo | kto | simpo | cpo
    use_lora: bool
    precision: str  # fp32 | bf16 | fp16
    batch_size: int
    max_length: int
    lora_rank: int = 8
    gradient_checkpointing: bool = True
    accelerator: str = "cpu"
    num_processes: int = 1
    zero_stage: int = 0  # 0: no ZeRO (local or torchrun DDP)
    offload_optimizer: bool = False
    offload_parameters: bool = False


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per device (per process), by component."""

    weights: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    overhead: int
    trainable_parameters: int

    @property
    def total(self) -> int:
        return self.weights + self.gradients + self.optimizer + self.activations + self.logits + self.overhead

    def describe(self) -> str:
        parts = ("weights", "gradients", "optimizer", "activations", "logits", "overhead")
        return f"{gib(self.total)} = " + " + ".join(f"{p} {gib(getattr(self, p))}" for p in parts)


def gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def lora_parameters(shape: ModelShape, rank: int) -> int:
    """LoRA A+B parameters on every linear layer of the decoder blocks ("all-linear")."""
    h, i = shape.hidden_size, shape.intermediate_size
    kv = h * shape.num_kv_heads // max(1, shape.num_heads)
    linears = [(h, h), (h, kv), (h, kv), (h, h), (h, i), (h, i), (i, h)]  # q k v o gate up down
    return shape.num_layers * rank * sum(a + b for a, b in linears)


def estimate_memory(shape: ModelShape, req: MemoryRequest) -> MemoryEstimate:
    """Peak bytes one training process needs on its device (RAM on CPU)."""
    n = max(1, req.num_processes)
    zero = req.zero_stage
    act_bytes = 2 if req.precision in ("bf16", "fp16") else 4
    # Models are loaded in bf16 for bf16 training; fp16 AMP keeps fp32 master weights.
    weight_bytes = 2 if req.precision == "bf16" else 4
    params = shape.parameter_count

    base_weights = params * (0.55 if req.method == "qlora" else weight_bytes)  # NF4 + quantization constants
    if req.use_lora:
        trainable = lora_parameters(shape, req.lora_rank)
        if req.method == "dora":
            trainable += shape.num_layers * 7 * shape.hidden_size  # magnitude vectors
        per_trainable = 4  # adapters are kept in fp32
        weights = base_weights + trainable * per_trainable
    else:
        trainable = params
        per_trainable = weight_bytes
        weights = base_weights
        if req.method in REFERENCE_METHODS:
            weights += params * weight_bytes  # frozen reference copy
    gradients = trainable * per_trainable
    optimizer = trainable * 8  # AdamW exp_avg + exp_avg_sq in fp32
    if zero >= 1:
        optimizer = 0 if req.offload_optimizer else optimizer / n
    if zero >= 2:
        gradients /= n
    if zero >= 3:
        weights = 0 if req.offload_parameters else weights / n

    seqs = req.batch_size * (2 if req.method in PAIRED_METHODS else 1)
    tokens = seqs * req.max_length
    h, layers = shape.hidden_size, shape.num_layers
    # Per layer without recomputation: s*b*h*(34 + 5*a*s/h) bytes at 16 bits (Korthikanti et al. 2022),
    # with the MLP term scaled to the model's intermediate size.
    mlp_scale = shape.intermediate_size / (4 * h)
    per_layer = tokens * h * (10 + 24 * mlp_scale) * act_bytes / 2
    per_layer += 5 * shape.num_heads * seqs * req.max_length**2 * act_bytes / 2
    if req.gradient_checkpointing:
        activations = layers * tokens * h * act_bytes + per_layer
    else:
        activations = layers * per_layer
    logits = tokens * shape.vocab_size * (act_bytes + 8)  # logits, fp32 upcast and its gradient
    return MemoryEstimate(
        weights=int(weights), gradients=int(gradients), optimizer=int(optimizer), activations=int(activations),
        logits=int(logits), overhead=RUNTIME_OVERHEAD.get(req.accelerator, GIB // 2), trainable_parameters=trainable,
    )
