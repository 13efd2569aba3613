"""``InferenceClient``: deployments, adapters and generation of the inference service."""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass

from modelyard.inference.v1 import inference_pb2 as ipb
from modelyard.inference.v1 import inference_pb2_grpc

from ._base import ServiceClient, follow_pages


@dataclass(frozen=True)
class ScoredContinuation:
    """The log-likelihood of one continuation given the context."""

    logprob: float  # sum of the token log-probabilities (natural log)
    is_greedy: bool  # every token was the most likely one at its position
    token_ids: list[int]  # the continuation's tokens as scored
    token_logprobs: list[float]  # log p(token_i | context, tokens before i)


@dataclass(frozen=True)
class ScoreResult:
    """``InferenceClient.score``: one entry per continuation, in request order."""

    scores: list[ScoredContinuation]
    context_tokens: int  # tokens of the context as scored
    prompt_tokens: int  # context plus continuation tokens scored

    @classmethod
    def from_proto(cls, msg: ipb.ScoreResponse) -> ScoreResult:
        return cls(
            scores=[
                ScoredContinuation(s.logprob, s.is_greedy, list(s.token_ids), list(s.token_logprobs))
                for s in msg.scores
            ],
            context_tokens=msg.context_tokens,
            prompt_tokens=msg.usage.prompt_tokens,
        )


class InferenceClient(ServiceClient):
    """Typed async client of ``modelyard.inference.v1.InferenceService``."""

    _stub_class = inference_pb2_grpc.InferenceServiceStub

    async def deploy(
        self, deployment: ipb.Deployment, *, deployment_id: str = "", timeout: float | None = None
    ) -> ipb.Deployment:
        """Create a deployment (it turns READY once its engine answers; poll ``get_deployment``)."""
        return await self._unary(
            "Deploy", ipb.DeployRequest(deployment=deployment, deployment_id=deployment_id), timeout
        )

    async def get_deployment(self, name: str, *, timeout: float | None = None) -> ipb.Deployment:
        return await self._unary("GetDeployment", ipb.GetDeploymentRequest(name=name), timeout)

    async def list_deployments(
        self,
        *,
        filter: str = "",
        order_by: str = "",
        page_size: int = 0,
        page_token: str = "",
        timeout: float | None = None,
    ) -> ipb.ListDeploymentsResponse:
        return await self._unary(
            "ListDeployments",
            ipb.ListDeploymentsRequest(filter=filter, order_by=order_by, page_size=page_size, page_token=page_token),
            timeout,
        )

    def iter_deployments(
        self, *, filter: str = "", order_by: str = "", page_size: int = 0, limit: int = 0, timeout: float | None = None
    ) -> AsyncIterator[ipb.Deployment]:
        return follow_pages(
            lambda token: self.list_deployments(
                filter=filter, order_by=order_by, page_size=page_size, page_token=token, timeout=timeout
            ),
            "deployments",
            limit,
        )

    async def undeploy(self, name: str, *, timeout: float | None = None) -> ipb.Deployment:
        return await self._unary("Undeploy", ipb.UndeployRequest(name=name), timeout)

    async def load_adapter(self, name: str, *, adapter: ipb.Adapter, timeout: float | None = None) -> ipb.Deployment:
        return await self._unary("LoadAdapter", ipb.LoadAdapterRequest(name=name, adapter=adapter), timeout)

    async def unload_adapter(self, name: str, *, alias: str, timeout: float | None = None) -> ipb.Deployment:
        return await self._unary("UnloadAdapter", ipb.UnloadAdapterRequest(name=name, alias=alias), timeout)

    def chat(
        self,
        *,
        deployment: str,
        messages: Sequence[ipb.ChatMessage],
        adapter: str = "",
        sampling: ipb.SamplingParams | None = None,
        response_format: ipb.ResponseFormat | None = None,
        tools_json: str = "",
        tool_choice_json: str = "",
        parallel_tool_calls: bool | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[ipb.ChatChunk]:
        """The chunks of a chat completion (never retried: generation is not repeated behind your back)."""
        return self._server_stream(
            "Chat",
            ipb.ChatRequest(
                deployment=deployment,
                adapter=adapter,
                messages=list(messages),
                sampling=sampling,
                response_format=response_format,
                tools_json=tools_json,
                tool_choice_json=tool_choice_json,
                parallel_tool_calls=parallel_tool_calls,
            ),
            timeout,
        )

    def complete(
        self,
        *,
        deployment: str,
        prompt: str = "",
        prompt_token_ids: Sequence[int] = (),
        adapter: str = "",
        sampling: ipb.SamplingParams | None = None,
        echo: bool = False,
        response_format: ipb.ResponseFormat | None = None,
        timeout: float | None = None,
    ) -> AsyncIterator[ipb.CompleteChunk]:
        """The chunks of a text completion of ``prompt`` (or ``prompt_token_ids``)."""
        return self._server_stream(
            "Complete",
            ipb.CompleteRequest(
                deployment=deployment,
                adapter=adapter,
                prompt=prompt,
                prompt_token_ids=list(prompt_token_ids),
                sampling=sampling,
                echo=echo,
                response_format=response_format,
            ),
            timeout,
        )

    async def tokenize(
        self,
        *,
        deployment: str,
        prompt: str = "",
        messages: Sequence[ipb.ChatMessage] = (),
        add_generation_prompt: bool = False,
        add_special_tokens: bool = False,
        timeout: float | None = None,
    ) -> ipb.TokenizeResponse:
        return await self._unary(
            "Tokenize",
            ipb.TokenizeRequest(
                deployment=deployment,
                prompt=prompt,
                messages=list(messages),
                add_generation_prompt=add_generation_prompt,
                add_special_tokens=add_special_tokens,
            ),
            timeout,
        )

    async def embed(
        self, *, deployment: str, inputs: Sequence[str], dimensions: int | None = None, timeout: float | None = None
    ) -> ipb.EmbedResponse:
        """Embed each of ``inputs``; ``dimensions`` truncates them (unset: the model's full size)."""
        request = ipb.EmbedRequest(deployment=deployment, inputs=list(inputs))
        if dimensions is not None:  # optional field: 0 would be sent (and rejected), not left unset
            request.dimensions = dimensions
        return await self._unary("Embed", request, timeout)

    async def score(
        self,
        deployment: str,
        *,
        continuations: Sequence[str] | Sequence[Sequence[int]],
        context: str | None = None,
        context_token_ids: Sequence[int] | None = None,
        context_messages: Sequence[ipb.ChatMessage] | None = None,
        adapter: str = "",
        timeout: float | None = None,
    ) -> ScoreResult:
        """Log-likelihood of each of ``continuations`` (texts, or token-id lists) given one context.

        The context is at most one of ``context`` (text), ``context_token_ids`` or
        ``context_messages`` (rendered with the model's chat template and the assistant opener);
        none scores from the BOS (else EOS) token. Text is encoded as lm-evaluation-harness does
        (the context's trailing whitespace moves into the continuation; context + continuation is
        tokenized as a whole), so the results equal its ``loglikelihood`` on the same deployment,
        while the engine computes the context once for all continuations. Raises InvalidArgument
        naming the field (``continuations[2]``) when a continuation is empty or does not fit.
        """
        request = ipb.ScoreRequest(
            deployment=deployment,
            adapter=adapter,
            context=context or "",
            context_token_ids=list(context_token_ids or ()),
            context_messages=list(context_messages or ()),
        )
        for c in continuations:
            if isinstance(c, str):
                request.continuations.append(ipb.ScoreContinuation(text=c))
            else:
                request.continuations.append(ipb.ScoreContinuation(token_ids=list(c)))
        return ScoreResult.from_proto(await self._unary("Score", request, timeout))
