"""The OpenAI-compatible REST gateway in front of the inference service."""
