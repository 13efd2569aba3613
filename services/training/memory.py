"""Peak-memory estimate of a training job, per device (per process), before any compute.

The estimate adds, per process: weights (4-bit for QLoRA), gradients and AdamW states of the
trainable parameters (LoRA adapters or all weights; ZeRO partitions them across processes),
a reference model for full-weight DPO/KTO, activations (per-layer inputs only with gradient
checkpointing, the Korthikanti et al. per-layer formula otherwise), the logits and their
gradient in fp32, and a fixed runtime overhead. It is deliberately on the high side.

A vision-language model counts its vision tower and aligner in the weights; their parameters train (gradients,
optimizer states) only when unfrozen, and the vision tower's activations over a sample's image patches are added.
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
    # A vision-language model's vision side (0 for a text-only model): parameters of the vision tower and of the
    # aligner (projector / patch merger), its width and depth. ``parameter_count`` includes them.
    vision_parameters: int = 0
    aligner_parameters: int = 0
    vision_hidden_size: int = 0
    vision_layers: int = 0

    @classmethod
    def from_config(cls, config: dict[str, Any], parameter_count: int) -> ModelShape:
        """From a Hugging Face ``config.json``; missing fields get llama-like guesses from the size."""
        text = config.get("text_config") or config
        hidden = int(text.get("hidden_size") or text.get("n_embd") or guess_hidden(parameter_count))
        layers = int(text.get("num_hidden_layers") or text.get("n_layer") or max(1, parameter_count // (12 * hidden**2)))
        heads = int(text.get("num_attention_heads") or text.get("n_head") or max(1, hidden // 128))
        vision = vision_shape(config.get("vision_config") or {}, hidden)
        return cls(
            parameter_count=parameter_count,
            hidden_size=hidden,
            num_layers=layers,
            num_heads=heads,
            num_kv_heads=int(text.get("num_key_value_heads") or heads),
            intermediate_size=int(text.get("intermediate_size") or text.get("n_inner") or 4 * hidden),
            vocab_size=int(text.get("vocab_size") or 32000),
            **vision,
        )


def vision_shape(vision_config: dict[str, Any], text_hidden: int) -> dict[str, int]:
    """Parameters, width and depth of a vision tower and its aligner from a ``vision_config`` (ViT blocks of
    attention + MLP, a patch embedding, an aligner from ``width * merge**2`` features to the language model's
    width through one hidden layer as Qwen2-VL's merger / LLaVA's projector); {} without one."""
    if not vision_config:
        return {}
    width = int(vision_config.get("embed_dim") or vision_config.get("hidden_size") or 0)
    depth = int(vision_config.get("depth") or vision_config.get("num_hidden_layers") or 0)
    if not width or not depth:
        return {}
    mlp = int(vision_config.get("intermediate_size") or width * float(vision_config.get("mlp_ratio") or 4))
    patch = int(vision_config.get("patch_size") or 14)
    temporal = int(vision_config.get("temporal_patch_size") or 1)
    channels = int(vision_config.get("in_channels") or vision_config.get("num_channels") or 3)
    block = 4 * width * width + 2 * width * mlp + 9 * width + mlp  # qkv + proj, fc1 + fc2, biases and norms
    tower = depth * block + channels * temporal * patch * patch * width
    merged = width * int(vision_config.get("spatial_merge_size") or 1) ** 2
    aligner = merged * merged + merged * text_hidden + merged + text_hidden + 2 * width
    return {"vision_parameters": tower, "aligner_parameters": aligner, "vision_hidden_size": width,
            "vision_layers": depth}


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
    # Vision-language models: which parts train (frozen parts get no gradients nor optimizer states; with LoRA
    # an unfrozen part trains fully as an extra copy) and the vision patches one sample may hold.
    train_vision: bool = False
    train_aligner: bool = False
    image_patches_per_sample: int = 0


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
    vision_trained = shape.vision_parameters * req.train_vision + shape.aligner_parameters * req.train_aligner
    vision_frozen = shape.vision_parameters + shape.aligner_parameters - vision_trained
    if req.use_lora:
        trainable = lora_parameters(shape, req.lora_rank) + vision_trained  # unfrozen parts: modules_to_save
        if req.method == "dora":
            trainable += shape.num_layers * 7 * shape.hidden_size  # magnitude vectors
        per_trainable = 4  # adapters are kept in fp32
        weights = base_weights + trainable * per_trainable
    else:
        trainable = params - vision_frozen
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
    if shape.vision_layers and req.image_patches_per_sample:
        # The vision tower over every patch of the batch's images: its per-layer inputs (with checkpointing)
        # or a ViT block's working set (attention + MLP, ~16 widths per patch) on every layer.
        patches = req.batch_size * req.image_patches_per_sample * (2 if req.method in PAIRED_METHODS else 1)
        per_patch_layer = shape.vision_hidden_size * act_bytes * (1 if req.gradient_checkpointing else 16)
        activations += shape.vision_layers * patches * per_patch_layer
    logits = tokens * shape.vocab_size * (act_bytes + 8)  # logits, fp32 upcast and its gradient
    return MemoryEstimate(
        weights=int(weights), gradients=int(gradients), optimizer=int(optimizer), activations=int(activations),
        logits=int(logits), overhead=RUNTIME_OVERHEAD.get(req.accelerator, GIB // 2), trainable_parameters=trainable,
    )
