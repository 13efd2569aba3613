"""gRPC servicer of the inference service: proto <-> domain only."""

from __future__ import annotations

from collections.abc import AsyncIterator

from modelyard.inference.v1 import inference_pb2 as pb
from modelyard.inference.v1 import inference_pb2_grpc

from . import protocol
from .deployments import Deployments
from .streaming import Pacer


class InferenceServicer(inference_pb2_grpc.InferenceServiceServicer):
    def __init__(self, deployments: Deployments, pacer: Pacer | None = None) -> None:
        self._deployments = deployments
        self._pacer = pacer or Pacer(0.0, 1)

    # ------------------------------------------------------------------ control plane

    async def Deploy(self, request: pb.DeployRequest, context) -> pb.Deployment:
        d = request.deployment
        view = await self._deployments.deploy(
            model_version=d.model_version, engine=protocol.engine_name(d.engine),
            options=protocol.options_from_proto(d.options),
            adapters=[(a.alias, a.model_version) for a in d.adapters], replicas=d.replicas,
            served_model_name=d.served_model_name, deployment_id=request.deployment_id,
        )
        return protocol.deployment_to_proto(view)

    async def GetDeployment(self, request: pb.GetDeploymentRequest, context) -> pb.Deployment:
        return protocol.deployment_to_proto(await self._deployments.get(request.name))

    async def ListDeployments(self, request: pb.ListDeploymentsRequest, context) -> pb.ListDeploymentsResponse:
        page = await self._deployments.list(page_size=request.page_size, page_token=request.page_token,
                                            filter=request.filter, order_by=request.order_by)
        return pb.ListDeploymentsResponse(deployments=[protocol.deployment_to_proto(v) for v in page.items],
                                          next_page_token=page.next_page_token)

    async def Undeploy(self, request: pb.UndeployRequest, context) -> pb.Deployment:
        return protocol.deployment_to_proto(await self._deployments.undeploy(request.name))

    async def LoadAdapter(self, request: pb.LoadAdapterRequest, context) -> pb.Deployment:
        view = await self._deployments.load_adapter(request.name, request.adapter.alias,
                                                    request.adapter.model_version)
        return protocol.deployment_to_proto(view)

    async def UnloadAdapter(self, request: pb.UnloadAdapterRequest, context) -> pb.Deployment:
        return protocol.deployment_to_proto(await self._deployments.unload_adapter(request.name, request.alias))

    # ------------------------------------------------------------------ data plane

    async def Chat(self, request: pb.ChatRequest, context) -> AsyncIterator[pb.ChatChunk]:
        engine, model = self._deployments.engine_for(request.deployment, request.adapter, generate=True,
                                                     image_field=protocol.first_image_field(request.messages))
        body = protocol.chat_body(request, model, self._deployments.settings.max_image_bytes)
        interval = self._pacer.interval()
        stream = self._pacer.stream(engine.chat(body, interval_s=interval),
                                    pace=not engine.paces_stream(interval))
        try:
            async for batch in stream:
                for msg in protocol.chat_chunks(batch):
                    yield msg
        finally:
            await stream.aclose()  # a cancelled call closes the engine stream: the engine aborts

    async def Complete(self, request: pb.CompleteRequest, context) -> AsyncIterator[pb.CompleteChunk]:
        engine, model = self._deployments.engine_for(request.deployment, request.adapter, generate=True)
        interval = self._pacer.interval()
        stream = self._pacer.stream(engine.complete(protocol.complete_body(request, model), interval_s=interval),
                                    pace=not engine.paces_stream(interval))
        try:
            async for batch in stream:
                for msg in protocol.complete_chunks(batch):
                    yield msg
        finally:
            await stream.aclose()

    async def Tokenize(self, request: pb.TokenizeRequest, context) -> pb.TokenizeResponse:
        engine, model = self._deployments.engine_for(request.deployment, generate=bool(request.messages),
                                                     image_field=protocol.first_image_field(request.messages))
        body = await engine.tokenize(protocol.tokenize_body(request, model,
                                                            self._deployments.settings.max_image_bytes))
        return pb.TokenizeResponse(tokens=body.get("tokens") or [], max_model_len=body.get("max_model_len") or 0)

    async def Embed(self, request: pb.EmbedRequest, context) -> pb.EmbedResponse:
        engine, model = self._deployments.engine_for(request.deployment)
        return protocol.embed_response(await engine.embed(protocol.embed_body(request, model)))

    async def Score(self, request: pb.ScoreRequest, context) -> pb.ScoreResponse:
        engine, model = self._deployments.engine_for(request.deployment, request.adapter, generate=True)
        return protocol.score_response(await engine.score(protocol.score_body(request, model)))
