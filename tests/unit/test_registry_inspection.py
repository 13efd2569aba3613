"""Model folder validation and inspection from file headers only."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from services.core.errors import InvalidArgument
from services.registry.inspection import detect_format, read_safetensors_header, validate_and_inspect
from services.registry.records import ModelFormat, ModelKind


def test_header_parameter_count_and_truncation(tmp_path):
    path = tmp_path / "model.safetensors"
    save_file({"a": np.zeros((3, 4), np.float16), "b": np.zeros((5,), np.float16)}, str(path))
    tensors = read_safetensors_header(path)
    assert sorted(tensors) == ["a", "b"] and tensors["a"]["shape"] == [3, 4]
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(InvalidArgument) as info:
        read_safetensors_header(path, "model.safetensors")
    assert info.value.reason == "SAFETENSORS_TRUNCATED" and "model.safetensors" in info.value.message
    path.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(InvalidArgument, match="not valid JSON"):
        read_safetensors_header(path)


def test_adapter_folder_is_detected_and_counted(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "base_model_name_or_path": "b"}))
    save_file({"lora_A": np.zeros((2, 8), np.float32)}, str(tmp_path / "adapter_model.safetensors"))
    assert detect_format(tmp_path) == (ModelKind.ADAPTER, ModelFormat.PEFT_ADAPTER)
    meta = validate_and_inspect(tmp_path, ModelFormat.PEFT_ADAPTER)
    assert (meta.parameter_count, meta.dtype, meta.model_type) == (16, "float32", "lora")


def test_full_model_needs_config_weights_and_tokenizer(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{}")
    save_file({"w": np.zeros((2, 2), np.float32)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(InvalidArgument) as info:
        validate_and_inspect(tmp_path, ModelFormat.SAFETENSORS)
    assert info.value.reason == "CONFIG_MISSING"
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "quantization_config": {"quant_method": "awq"}}))
    assert detect_format(tmp_path) == (ModelKind.QUANTIZED, ModelFormat.AWQ)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(InvalidArgument) as info:
        validate_and_inspect(tmp_path, ModelFormat.SAFETENSORS)
    assert info.value.reason == "CONFIG_INVALID"
