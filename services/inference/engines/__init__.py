"""Engines behind the ``Engine`` protocol: transformers (reference) and vllm."""
