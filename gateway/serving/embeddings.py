"""POST /v1/embeddings: OpenAI embedding requests -> the inference ``Embed`` call -> an embedding list."""

from __future__ import annotations

import base64
import struct

from modelyard.inference.v1 import inference_pb2 as pb
from services.core.errors import InvalidArgument

from .. import protocol as p
from ..routing import Target
from .base import CallContext, OpenAIServing


def embed_request(req: p.EmbeddingRequest, inputs: list[str], target: Target) -> pb.EmbedRequest:
    if target.adapter:
        raise InvalidArgument.for_field("model", "an adapter cannot embed; use the base model name")
    out = pb.EmbedRequest(deployment=target.deployment, inputs=inputs)
    if req.dimensions is not None:
        out.dimensions = req.dimensions
    return out


def embedding_data(e: pb.Embedding, encoding_format: str) -> p.EmbeddingData:
    """One vector as floats, or as base64 of its little-endian float32 values (what the SDK asks for)."""
    if encoding_format == "base64":
        return p.EmbeddingData(
            index=e.index, embedding=base64.b64encode(struct.pack(f"<{len(e.values)}f", *e.values)).decode()
        )
    return p.EmbeddingData(index=e.index, embedding=list(e.values))


class ServingEmbedding(OpenAIServing):
    async def create(self, ctx: CallContext, req: p.EmbeddingRequest) -> p.EmbeddingList:
        inputs = req.inputs()
        self.filter.check_prompt(inputs, "input")
        await self.admit(ctx, sum(len(x) for x in inputs), 0, 1)
        try:
            reply = await self.unary(ctx, "Embed", lambda t: embed_request(req, inputs, t))
            ctx.add_usage(reply.usage)
        finally:
            self.settle(ctx)
        data = [embedding_data(e, req.encoding_format) for e in sorted(reply.embeddings, key=lambda e: e.index)]
        return p.EmbeddingList(data=data, model=ctx.model, usage=p.Usage.of(ctx.prompt_tokens, 0))
