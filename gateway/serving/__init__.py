"""The gateway's serving logic, one module per endpoint family (chat, completions, embeddings,
models) on one shared base (``base.OpenAIServing``), in the manner of vLLM's ``serving_*``."""

from .base import DONE, CallContext, OpenAIServing, Upstream, until_disconnect
from .chat import ServingChat
from .completions import ServingCompletion
from .embeddings import ServingEmbedding
from .models import ServingModels

__all__ = [
    "DONE",
    "CallContext",
    "OpenAIServing",
    "ServingChat",
    "ServingCompletion",
    "ServingEmbedding",
    "ServingModels",
    "Upstream",
    "until_disconnect",
]
