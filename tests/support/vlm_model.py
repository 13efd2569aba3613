"""The multimodal fixtures: a tiny random Qwen2-VL (``cli.demo_vlm``, ~3 s to build) and the colour task."""

from __future__ import annotations

from pathlib import Path

import pytest

from cli.demo_vlm import build_tiny_vlm, write_shape_dataset


@pytest.fixture(scope="session")
def tiny_vlm(tmp_path_factory) -> Path:
    """A tiny random Qwen2-VL model folder (weights, tokenizer, image processor, chat template)."""
    return build_tiny_vlm(tmp_path_factory.mktemp("tiny-vlm") / "model")


@pytest.fixture(scope="session")
def shape_dataset(tmp_path_factory) -> Path:
    """48 rows of the colour task as a dataset archive (``data.jsonl`` + ``images/``)."""
    return write_shape_dataset(tmp_path_factory.mktemp("shapes") / "train", 48, seed=1)


@pytest.fixture(scope="session")
def shape_eval_dataset(tmp_path_factory) -> Path:
    """16 held-out rows of the colour task (other seed), as an archive."""
    return write_shape_dataset(tmp_path_factory.mktemp("shapes-eval") / "eval", 16, seed=2)
