"""The quantization rules, without I/O: which method takes which bits, group sizes, calibration and
backend; the group size that fits a model; which layers stay unquantized; the expected output size
and the memory a job needs. Preflight (``preflight.py``) applies them to a request; the quantizer
process (``quantizer.py``) applies the same layer rule to the loaded model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from services.core.errors import FieldViolation, InvalidArgument

# Group sizes tried, largest first, when a request leaves group_size at 0.
AUTO_GROUP_SIZES = (128, 64, 32)
PER_CHANNEL = -1
DEFAULT_SAMPLES = 64
DEFAULT_MAX_LENGTH = 512
MAX_SAMPLES = 4096
MAX_LENGTH = 32768

LLM_COMPRESSOR = "llm_compressor"
AUTOAWQ = "autoawq"
GPTQMODEL = "gptqmodel"
BITSANDBYTES = "bitsandbytes"
BACKENDS = (LLM_COMPRESSOR, AUTOAWQ, GPTQMODEL, BITSANDBYTES)
FORMATS = {LLM_COMPRESSOR: "compressed-tensors", AUTOAWQ: "awq", GPTQMODEL: "gptq", BITSANDBYTES: "bitsandbytes"}


@dataclass(frozen=True)
class Method:
    """One quantization method: what it accepts and what it is good for."""

    name: str  # awq | gptq | int8 | fp8 | w8a8 | bnb-nf4 | bnb-int8 (the CLI spelling)
    bits: tuple[int, ...]  # allowed weight bits; the first is the default
    grouped: bool  # takes a group size (else per channel only)
    calibrated: bool  # needs calibration data
    backends: tuple[str, ...]  # allowed backends; the first is the default
    needs_cuda: bool = False
    # What it is for, said by `yard quantize --help` and the docs.
    summary: str = ""

    @property
    def default_bits(self) -> int:
        return self.bits[0]


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method(
            "awq",
            (4,),
            True,
            True,
            (LLM_COMPRESSOR, AUTOAWQ),
            summary="W4A16 activation-aware, asymmetric: about 1/4 the size; on CPU slower than 16-bit",
        ),
        Method(
            "gptq",
            (4, 8),
            True,
            True,
            (LLM_COMPRESSOR, GPTQMODEL),
            summary="W4A16/W8A16 GPTQ, symmetric: the size choice; on CPU slower than 16-bit",
        ),
        Method(
            "int8",
            (8,),
            False,
            False,
            (LLM_COMPRESSOR,),
            summary="W8A16 round-to-nearest, no calibration: about 1/2 the size",
        ),
        Method(
            "fp8",
            (8,),
            False,
            False,
            (LLM_COMPRESSOR,),
            summary="FP8 e4m3 weights + dynamic FP8 activations: fast on GPUs with FP8 (Hopper/Ada), crawls on CPU",
        ),
        Method(
            "w8a8",
            (8,),
            False,
            True,
            (LLM_COMPRESSOR,),
            summary="SmoothQuant + GPTQ int8 weights and activations: the speed choice on CPU (vLLM int8 kernels)",
        ),
        Method(
            "bnb-nf4",
            (4,),
            False,
            False,
            (BITSANDBYTES,),
            needs_cuda=True,
            summary="bitsandbytes NF4 stored pre-quantized (CUDA only)",
        ),
        Method(
            "bnb-int8",
            (8,),
            False,
            False,
            (BITSANDBYTES,),
            needs_cuda=True,
            summary="bitsandbytes LLM.int8() stored pre-quantized (CUDA only)",
        ),
    )
}

# Proto enum value names (QUANTIZATION_METHOD_<X>) <-> method names.
PROTO_METHODS = {
    "AWQ": "awq",
    "GPTQ": "gptq",
    "INT8_WEIGHT_ONLY": "int8",
    "FP8_DYNAMIC": "fp8",
    "W8A8_INT8": "w8a8",
    "BNB_4BIT": "bnb-nf4",
    "BNB_8BIT": "bnb-int8",
}


@dataclass(frozen=True)
class Linear:
    """A linear layer of the decoder as a module-name pattern with its input and output sizes."""

    pattern: str  # e.g. "model.layers.*.self_attn.q_proj"
    in_features: int
    out_features: int
    count: int  # how many modules match (one per layer)


def decoder_linears(config: dict[str, Any]) -> list[Linear] | None:
    """The linear layers of a llama-like decoder (llama, qwen2/3, mistral, gemma...) from its config.json;
    None when the config lacks the sizes (the quantizer then finds the layers in the loaded model)."""
    text = config.get("text_config") or config
    try:
        h = int(text["hidden_size"])
        layers = int(text["num_hidden_layers"])
        heads = int(text["num_attention_heads"])
        inter = int(text["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return None
    kv_heads = int(text.get("num_key_value_heads") or heads)
    head_dim = int(text.get("head_dim") or h // heads)
    q, kv = heads * head_dim, kv_heads * head_dim
    attn, mlp = "model.layers.*.self_attn", "model.layers.*.mlp"
    return [
        Linear(f"{attn}.q_proj", h, q, layers),
        Linear(f"{attn}.k_proj", h, kv, layers),
        Linear(f"{attn}.v_proj", h, kv, layers),
        Linear(f"{attn}.o_proj", q, h, layers),
        Linear(f"{mlp}.gate_proj", h, inter, layers),
        Linear(f"{mlp}.up_proj", h, inter, layers),
        Linear(f"{mlp}.down_proj", inter, h, layers),
    ]


def auto_group_size(in_features: list[int]) -> int:
    """The largest of 128, 64, 32 dividing every input size; per channel (-1) when none does."""
    for size in AUTO_GROUP_SIZES:
        if all(n % size == 0 for n in in_features):
            return size
    return PER_CHANNEL


def ungroupable(linears: list[Linear], group_size: int) -> list[Linear]:
    """Layers whose input size is not a multiple of ``group_size`` (they stay unquantized)."""
    if group_size <= 0:
        return []
    return [lin for lin in linears if lin.in_features % group_size]


@dataclass(frozen=True)
class Resolved:
    """A request's method parameters with every default applied."""

    method: Method
    backend: str
    bits: int
    group_size: int  # > 0, or -1 per channel
    samples: int  # 0 for methods without calibration
    max_length: int

    @property
    def format(self) -> str:
        return FORMATS[self.backend]


def resolve(
    method: str,
    *,
    backend: str = "",
    bits: int = 0,
    group_size: int = 0,
    samples: int = 0,
    max_length: int = 0,
    calibration_dataset: str = "",
    linears: list[Linear] | None = None,
) -> Resolved:
    """Check the method / backend / bits / group size / calibration combination (``InvalidArgument`` naming
    every bad field under ``spec.``) and fill the defaults. ``linears`` (from ``decoder_linears``) picks the
    automatic group size; without them it is 128 or the method's per-channel."""
    violations: list[FieldViolation] = []
    m = METHODS.get(method)
    if m is None:
        raise InvalidArgument.for_field(
            "spec.method", f"must be one of {', '.join(METHODS)}, got {method or 'nothing'!r}"
        )
    backend = backend or m.backends[0]
    if backend not in m.backends:
        violations.append(
            FieldViolation("spec.backend", f"method {method} runs on {' or '.join(m.backends)}, not {backend}")
        )
    bits = bits or m.default_bits
    if bits not in m.bits:
        violations.append(
            FieldViolation("spec.bits", f"method {method} takes {' or '.join(map(str, m.bits))} bits, got {bits}")
        )
    grouped = m.grouped and not (bits == 8 and group_size == 0)  # 8-bit GPTQ: per channel unless a group is asked
    if group_size < PER_CHANNEL or (group_size > 0 and (group_size & (group_size - 1) or group_size < 16)):
        violations.append(
            FieldViolation(
                "spec.group_size", f"must be 0 (auto), -1 (per channel) or a power of two >= 16, got {group_size}"
            )
        )
    elif not m.grouped and group_size > 0:
        violations.append(
            FieldViolation(
                "spec.group_size",
                f"method {method} quantizes per channel; leave group_size at 0 or -1, got {group_size}",
            )
        )
    elif backend == AUTOAWQ and group_size == PER_CHANNEL:
        violations.append(
            FieldViolation("spec.group_size", "autoawq needs a group size (32, 64 or 128), not per channel")
        )
    if not m.calibrated and calibration_dataset:
        violations.append(
            FieldViolation(
                "spec.calibration_dataset_version", f"method {method} needs no calibration data; leave it empty"
            )
        )
    if samples < 0 or samples > MAX_SAMPLES:
        violations.append(FieldViolation("spec.calibration_samples", f"must be within 0..{MAX_SAMPLES}, got {samples}"))
    if max_length < 0 or max_length > MAX_LENGTH or 0 < max_length < 16:
        violations.append(
            FieldViolation("spec.calibration_max_length", f"must be 0 (default) or 16..{MAX_LENGTH}, got {max_length}")
        )
    if violations:
        raise InvalidArgument(
            "; ".join(f"{v.field}: {v.description}" for v in violations),
            violations=violations,
            reason="INVALID_QUANTIZATION_SPEC",
        )
    if not grouped:
        group = PER_CHANNEL
    elif group_size:
        group = group_size
    elif linears:
        group = auto_group_size([lin.in_features for lin in linears])
        if group == PER_CHANNEL and backend == AUTOAWQ:
            raise InvalidArgument.for_field(
                "spec.group_size",
                "no group size of 128, 64 or 32 divides every layer's input "
                "size and autoawq cannot quantize per channel; use the llm_compressor backend",
            )
    else:
        group = AUTO_GROUP_SIZES[0]
    return Resolved(
        m,
        backend,
        bits,
        group,
        (samples or DEFAULT_SAMPLES) if m.calibrated else 0,
        (max_length or DEFAULT_MAX_LENGTH) if m.calibrated else 0,
    )


def weight_bytes(dtype: str) -> int:
    return {"float32": 4, "fp32": 4, "float64": 8}.get(dtype, 2)


def expected_size(
    r: Resolved, linears: list[Linear] | None, parameter_count: int, dtype: str, skipped: list[Linear]
) -> int:
    """Bytes the quantized weights should take: quantized linears at ``bits`` plus one 16-bit scale (and a
    zero point for asymmetric AWQ) per group or output channel; every other parameter as in the source."""
    unit = weight_bytes(dtype)
    if not linears:
        return int(parameter_count * unit * r.bits / 16)  # rough: everything quantized from 16-bit
    quantized = [lin for lin in linears if lin not in skipped]
    total_q = sum(lin.in_features * lin.out_features * lin.count for lin in quantized)
    groups = sum(
        (lin.in_features // (r.group_size if r.group_size > 0 else lin.in_features)) * lin.out_features * lin.count
        for lin in quantized
    )
    per_group = 2 + (2 if r.method.name == "awq" else 0)
    return int(total_q * r.bits / 8 + groups * per_group + (parameter_count - total_q) * unit)


def estimate_memory(r: Resolved, parameter_count: int, hidden_size: int, dtype: str) -> int:
    """Peak RSS of a job: the model twice (weights + the quantized copy / reloaded model), the calibration
    activations the sequential pipeline keeps (samples x length x hidden, fp32, a few per layer), and the
    libraries themselves (about 1.5 GiB of torch, transformers and the quantizer)."""
    weights = parameter_count * max(weight_bytes(dtype), 2)
    activations = r.samples * r.max_length * hidden_size * 4 * 4
    return int(2.5 * weights + activations + 1.5 * (1 << 30))
