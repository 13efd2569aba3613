"""The quantization rules of services/quantization/methods.py: combinations, defaults, the group size
that fits a model, the layers left unquantized, the expected size."""

from __future__ import annotations

import pytest

from services.core.errors import InvalidArgument
from services.quantization import methods
from services.quantization.methods import PER_CHANNEL, decoder_linears, resolve

SMOLLM2 = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
           "intermediate_size": 1536, "head_dim": 64, "vocab_size": 49152}


def test_smollm2_gets_group_64_because_576_is_not_a_multiple_of_128():
    linears = decoder_linears(SMOLLM2)
    assert {lin.in_features for lin in linears} == {576, 1536}
    r = resolve("gptq", linears=linears)
    assert (r.bits, r.group_size, r.backend, r.format, r.samples, r.max_length) == (
        4, 64, "llm_compressor", "compressed-tensors", methods.DEFAULT_SAMPLES, methods.DEFAULT_MAX_LENGTH)
    skipped = methods.ungroupable(linears, 128)
    assert {lin.pattern.split(".")[-1] for lin in skipped} == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                               "up_proj"}
    assert methods.ungroupable(linears, 64) == []


@pytest.mark.parametrize(("sizes", "group"), [([4096, 11008], 128), ([576, 1536], 64), ([96, 192], 32),
                                              ([72, 144], PER_CHANNEL)])
def test_auto_group_size_is_the_largest_that_divides_every_input(sizes, group):
    assert methods.auto_group_size(sizes) == group


@pytest.mark.parametrize(("method", "kwargs", "field"), [
    ("gptq", {"bits": 3}, "spec.bits"),
    ("awq", {"bits": 8}, "spec.bits"),
    ("int8", {"group_size": 128}, "spec.group_size"),
    ("w8a8", {"backend": "gptqmodel"}, "spec.backend"),
    ("gptq", {"group_size": 100}, "spec.group_size"),
    ("gptq", {"group_size": -2}, "spec.group_size"),
    ("awq", {"backend": "autoawq", "group_size": -1}, "spec.group_size"),
    ("fp8", {"calibration_dataset": "datasets/d/versions/v1"}, "spec.calibration_dataset_version"),
    ("gptq", {"samples": -1}, "spec.calibration_samples"),
    ("gptq", {"max_length": 8}, "spec.calibration_max_length"),
    ("bnb-nf4", {"backend": "llm_compressor"}, "spec.backend"),
    ("nf5", {}, "spec.method"),
])
def test_unsupported_combinations_name_the_field(method, kwargs, field):
    with pytest.raises(InvalidArgument) as info:
        resolve(method, **kwargs)
    assert field in [v.field for v in info.value.violations] or info.value.violations[0].field == field


def test_several_bad_fields_are_reported_together():
    with pytest.raises(InvalidArgument) as info:
        resolve("int8", bits=4, group_size=64)
    assert {v.field for v in info.value.violations} == {"spec.bits", "spec.group_size"}


def test_defaults_per_method():
    assert (resolve("w8a8").bits, resolve("w8a8").group_size, resolve("w8a8").samples) == (8, PER_CHANNEL, 64)
    assert (resolve("int8").samples, resolve("fp8").samples, resolve("int8").max_length) == (0, 0, 0)
    assert resolve("gptq", bits=8).group_size == PER_CHANNEL  # 8-bit GPTQ: per channel unless a group is asked
    assert resolve("gptq", bits=8, group_size=128).group_size == 128
    assert resolve("awq", backend="autoawq").format == "awq" and resolve("gptq", backend="gptqmodel").format == "gptq"
    assert methods.METHODS["bnb-nf4"].needs_cuda and not methods.METHODS["gptq"].needs_cuda


def test_expected_size_counts_quantized_linears_at_their_bits_and_the_rest_as_in_the_source():
    linears = decoder_linears(SMOLLM2)
    params = 134_515_008
    linear_params = sum(lin.in_features * lin.out_features * lin.count for lin in linears)
    r4 = resolve("gptq", linears=linears)
    size4 = methods.expected_size(r4, linears, params, "bfloat16", [])
    embeddings = (params - linear_params) * 2
    assert embeddings + linear_params // 2 < size4 < embeddings + linear_params // 2 * 1.1
    r8 = resolve("w8a8", linears=linears)
    assert size4 < methods.expected_size(r8, linears, params, "bfloat16", []) < params * 2
    # layers left unquantized keep their 16-bit size
    skipped = methods.ungroupable(linears, 128)
    r128 = resolve("gptq", group_size=128, linears=linears)
    assert methods.expected_size(r128, linears, params, "bfloat16", skipped) > size4


def test_memory_estimate_grows_with_calibration_and_model():
    small = methods.estimate_memory(resolve("gptq", samples=16, max_length=128), 10_000_000, 256, "float32")
    big = methods.estimate_memory(resolve("gptq", samples=512, max_length=2048), 10_000_000, 256, "float32")
    assert 1 << 30 < small < big
