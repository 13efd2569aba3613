"""The inference service through real gRPC: an in-process registry and inference service, a real
nanio S3 server, real SQLite, and the transformers engine as a real child process serving a tiny
model and a random LoRA adapter. One deployment is shared by the module (engine starts are the
slow part); tests that disrupt it (engine kill, service restart, undeploy) run last."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import sys
import time
import uuid
from pathlib import Path

import grpc
import httpx
import pytest
import pytest_asyncio

from cli.demo_models import build_tiny_model
from modelyard.inference.v1 import inference_pb2 as pb
from modelyard.inference.v1 import inference_pb2_grpc
from modelyard.registry.v1 import registry_pb2 as rpb
from modelyard.registry.v1 import registry_pb2_grpc
from services.core.artifacts import S3ArtifactStore
from services.core.grpc_client import error_from_rpc_error, make_channel
from services.core.settings import GrpcServerSettings, S3Settings
from services.inference.app import build_app as build_inference
from services.inference.settings import InferenceSettings
from services.registry.app import build_app as build_registry
from services.registry.settings import RegistrySettings

pytestmark = [pytest.mark.asyncio(loop_scope="module"), pytest.mark.timeout(300)]

DEPLOYMENT = "deployments/tiny"
GREEDY = dict(temperature=0.0)


# ----------------------------------------------------------------------------- helpers


def make_lora_adapter(model_dir: Path, dest: Path, seed: int = 1) -> Path:
    """A random peft LoRA adapter for ``model_dir`` with non-zero B weights (it changes the output)."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"], init_lora_weights=False)
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    peft_model.save_pretrained(dest)
    return dest


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def rpc_error(awaitable) -> tuple[grpc.StatusCode, str, str]:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await awaitable
    return info.value.code(), error_from_rpc_error(info.value).reason, info.value.details()


async def wait_state(stub, name: str, states: set[int], timeout: float = 120) -> pb.Deployment:
    deadline = time.monotonic() + timeout
    while True:
        d = await stub.GetDeployment(pb.GetDeploymentRequest(name=name))
        if d.state in states:
            return d
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} stayed {pb.DeploymentState.Name(d.state)}: {d.error.message}")
        await asyncio.sleep(0.2)


async def chat(stub, content: str, **kw) -> list[pb.ChatChunk]:
    adapter = kw.pop("adapter", "")
    request = pb.ChatRequest(deployment=DEPLOYMENT, adapter=adapter,
                             messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=content)],
                             sampling=pb.SamplingParams(**kw))
    return [c async for c in stub.Chat(request)]


async def complete(stub, prompt: str, echo: bool = False, adapter: str = "", **kw) -> list[pb.CompleteChunk]:
    request = pb.CompleteRequest(deployment=DEPLOYMENT, prompt=prompt, echo=echo, adapter=adapter,
                                 sampling=pb.SamplingParams(**kw))
    return [c async for c in stub.Complete(request)]


def texts(chunks, field: str = "text") -> dict[int, str]:
    out: dict[int, str] = {}
    for chunk in chunks:
        for c in chunk.choices:
            out[c.index] = out.get(c.index, "") + getattr(c, field)
    return out


def finish_reasons(chunks) -> dict[int, int]:
    return {c.index: c.finish_reason for chunk in chunks for c in chunk.choices if c.finish_reason}


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def module_s3(s3_server) -> S3Settings:
    return S3Settings(endpoint=s3_server.endpoint, access_key=s3_server.access_key,
                      secret_key=s3_server.secret_key, bucket=f"t-{uuid.uuid4().hex[:12]}",
                      connect_retries=2, retry_backoff_s=0.05)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("inference")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def registry(workdir, module_s3):
    settings = RegistrySettings(data_dir=workdir / "registry", s3=module_s3, grpc=GrpcServerSettings(port=0),
                                import_workers=1, hf_endpoint="http://127.0.0.1:9", hf_token=None)
    app = build_registry(settings, metrics=False, default_port=0)
    await app.start()
    channel = make_channel(f"127.0.0.1:{app.server.port}", default_timeout_s=60)
    stub = registry_pb2_grpc.RegistryServiceStub(channel)
    stub.addr = f"127.0.0.1:{app.server.port}"  # type: ignore[attr-defined]
    yield stub
    await channel.close()
    await app.stop(grace=1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def versions(workdir, module_s3, registry) -> dict[str, str]:
    """A tiny base model and two LoRA adapters registered in the registry."""
    store = S3ArtifactStore.connect(module_s3)
    model_dir = build_tiny_model(workdir / "tiny")
    store.upload_dir("uploads/tiny/base", model_dir)
    base = await registry.CreateModelVersion(rpb.CreateModelVersionRequest(
        parent="models/tiny", version_id="base",
        model_version=rpb.ModelVersion(artifact_prefix="uploads/tiny/base")))
    out = {"base": base.name}
    for key, seed in (("lora", 1), ("lora2", 2)):
        adapter_dir = make_lora_adapter(model_dir, workdir / key, seed=seed)
        store.upload_dir(f"uploads/tiny-{key}/v1", adapter_dir)
        adapter = await registry.RegisterDerivedVersion(rpb.RegisterDerivedVersionRequest(
            parent=f"models/tiny-{key}", version_id="v1", kind=rpb.MODEL_KIND_ADAPTER,
            artifact_prefix=f"uploads/tiny-{key}/v1",
            lineage=rpb.Lineage(base_model_version=base.name)))
        out[key] = adapter.name
    return out


def inference_settings(workdir: Path, module_s3: S3Settings, registry_addr: str) -> InferenceSettings:
    return InferenceSettings(
        data_dir=workdir / "inference", s3=module_s3, grpc=GrpcServerSettings(port=0), registry_addr=registry_addr,
        vllm_python=workdir / "no-vllm" / "bin" / "python", restart_backoff_initial_s=0.5,
        health_interval_s=0.5, engine_start_timeout_s=120, omp_threads=1,
    )


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def service(workdir, module_s3, registry, versions):
    """The inference service with deployment ``tiny`` (base + adapter ``styled``) READY; (app, stub)."""
    app = build_inference(inference_settings(workdir, module_s3, registry.addr), metrics=False, default_port=0)
    await app.start()
    channel = make_channel(f"127.0.0.1:{app.server.port}", default_timeout_s=120)
    stub = inference_pb2_grpc.InferenceServiceStub(channel)
    created = await stub.Deploy(pb.DeployRequest(deployment_id="tiny", deployment=pb.Deployment(
        model_version=versions["base"], engine=pb.ENGINE_TRANSFORMERS,
        adapters=[pb.Adapter(alias="styled", model_version=versions["lora"])],
        options=pb.EngineOptions(max_num_seqs=32))))
    assert created.state == pb.DEPLOYMENT_STATE_CREATING
    await wait_state(stub, DEPLOYMENT, {pb.DEPLOYMENT_STATE_READY, pb.DEPLOYMENT_STATE_FAILED})
    holder = {"app": app, "stub": stub, "channel": channel}
    yield holder
    await holder["channel"].close()
    await holder["app"].stop(grace=1)


@pytest.fixture
def stub(service):
    return service["stub"]


# ----------------------------------------------------------------------------- control plane


async def test_deploy_becomes_ready_and_marks_the_version(stub, registry, versions):
    d = await stub.GetDeployment(pb.GetDeploymentRequest(name=DEPLOYMENT))
    assert d.state == pb.DEPLOYMENT_STATE_READY, d.error.message
    assert d.engine == pb.ENGINE_TRANSFORMERS and d.model_version == versions["base"]
    assert [a.alias for a in d.adapters] == ["styled"] and d.served_model_name == "tiny"
    assert d.engine_endpoints and d.engine_endpoints[0].startswith("http://127.0.0.1:")
    base = await registry.GetModelVersion(rpb.GetModelVersionRequest(name=versions["base"]))
    assert DEPLOYMENT in base.deployed_by
    listed = await stub.ListDeployments(pb.ListDeploymentsRequest(filter="state = DEPLOYMENT_STATE_READY"))
    assert [x.name for x in listed.deployments] == [DEPLOYMENT]
    none = await stub.ListDeployments(pb.ListDeploymentsRequest(filter="state = DEPLOYMENT_STATE_FAILED"))
    assert not none.deployments
    both = await stub.ListDeployments(pb.ListDeploymentsRequest(
        filter=f'engine = ENGINE_TRANSFORMERS AND model_version = "{versions["base"]}"', order_by="name desc"))
    assert [x.name for x in both.deployments] == [DEPLOYMENT] and not both.next_page_token


async def test_deploy_errors_name_the_problem(stub, versions):
    code, reason, msg = await rpc_error(stub.Deploy(pb.DeployRequest(deployment=pb.Deployment(
        model_version="models/tiny/versions/missing", engine=pb.ENGINE_TRANSFORMERS))))
    assert code == grpc.StatusCode.NOT_FOUND, msg
    code, _, msg = await rpc_error(stub.Deploy(pb.DeployRequest(deployment=pb.Deployment(
        model_version=versions["base"]))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "deployment.engine" in msg
    code, reason, msg = await rpc_error(stub.Deploy(pb.DeployRequest(deployment=pb.Deployment(
        model_version=versions["base"], engine=pb.ENGINE_VLLM))))
    assert code == grpc.StatusCode.FAILED_PRECONDITION and reason == "ENGINE_NOT_INSTALLED"
    assert "vLLM engine not installed: run make engine-vllm" in msg
    code, reason, _ = await rpc_error(stub.Deploy(pb.DeployRequest(deployment_id="tiny", deployment=pb.Deployment(
        model_version=versions["base"], engine=pb.ENGINE_TRANSFORMERS))))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    code, _, msg = await rpc_error(stub.Deploy(pb.DeployRequest(deployment=pb.Deployment(
        model_version=versions["lora"], engine=pb.ENGINE_TRANSFORMERS))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "is an adapter" in msg
    code, _, msg = await rpc_error(stub.GetDeployment(pb.GetDeploymentRequest(name="deployments/nope")))
    assert code == grpc.StatusCode.NOT_FOUND
    code, _, msg = await rpc_error(stub.ListDeployments(pb.ListDeploymentsRequest(page_size=-1)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "page_size" in msg
    code, _, msg = await rpc_error(stub.ListDeployments(pb.ListDeploymentsRequest(filter="colour = red")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "filter" in msg and "colour" in msg
    code, _, msg = await rpc_error(stub.ListDeployments(pb.ListDeploymentsRequest(order_by="engine")))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "order_by" in msg


# ----------------------------------------------------------------------------- data plane


async def test_chat_streams_deltas_then_usage(stub):
    chunks = await chat(stub, "What is the capital of France?", max_tokens=6, **GREEDY)
    assert len({c.id for c in chunks}) == 1
    deltas = [c for c in chunks if c.choices]
    assert deltas[0].choices[0].role == pb.CHAT_ROLE_ASSISTANT
    assert len(deltas) >= 2  # streamed, not one blob
    assert chunks[-1].HasField("usage") and not chunks[-1].choices
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 6
    reason = finish_reasons(chunks)[0]
    assert reason == (pb.FINISH_REASON_LENGTH if usage.completion_tokens == 6 else pb.FINISH_REASON_STOP)
    again = await chat(stub, "What is the capital of France?", max_tokens=6, **GREEDY)
    assert texts(again, "content") == texts(chunks, "content")  # greedy is deterministic


async def test_completion_n2_max_tokens_and_seed(stub):
    chunks = await complete(stub, "The capital of France is", n=2, max_tokens=5, temperature=1.0, seed=7)
    out = texts(chunks)
    assert set(out) == {0, 1}
    reasons = finish_reasons(chunks)
    assert set(reasons) == {0, 1} and set(reasons.values()) <= {pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP}
    assert chunks[-1].usage.completion_tokens <= 10
    same = await complete(stub, "The capital of France is", n=2, max_tokens=5, temperature=1.0, seed=7)
    assert texts(same) == out  # a seed makes sampling reproducible
    one = await complete(stub, "The capital of France is", max_tokens=1, **GREEDY)
    assert finish_reasons(one) == {0: pb.FINISH_REASON_LENGTH} and one[-1].usage.completion_tokens == 1


async def test_stop_string_cuts_the_output(stub):
    full = texts(await complete(stub, "Hello! How can I", max_tokens=12, **GREEDY))[0]
    assert len(full) > 4
    stop = full[2:4]
    cut = await complete(stub, "Hello! How can I", max_tokens=12, stop=[stop], **GREEDY)
    assert texts(cut)[0] == full[: full.index(stop)]
    assert finish_reasons(cut) == {0: pb.FINISH_REASON_STOP}


async def test_logprobs_of_generated_tokens(stub):
    chunks = await chat(stub, "Hello", max_tokens=4, logprobs=True, top_logprobs=3, **GREEDY)
    logprobs = [lp for c in chunks for ch in c.choices for lp in ch.logprobs]
    assert len(logprobs) == chunks[-1].usage.completion_tokens or len(logprobs) == 4
    for lp in logprobs:
        assert lp.HasField("logprob") and lp.logprob <= 0
        assert len(lp.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert lp.logprob == pytest.approx(lp.top_logprobs[0].logprob, abs=1e-5)


async def test_echo_returns_prompt_logprobs_for_loglikelihood(stub):
    prompt = "The capital of France is Paris"
    chunks = await complete(stub, prompt, echo=True, max_tokens=1, logprobs=True, top_logprobs=1, **GREEDY)
    assert texts(chunks)[0].startswith(prompt)
    lps = [lp for c in chunks for ch in c.choices for lp in ch.logprobs]
    prompt_tokens = chunks[-1].usage.prompt_tokens
    assert len(lps) == prompt_tokens + 1
    assert not lps[0].HasField("logprob")  # nothing precedes the first token
    assert all(lp.HasField("logprob") and lp.logprob < 0 for lp in lps[1:])
    assert "".join(lp.token for lp in lps[:prompt_tokens]) == prompt
    zero = await complete(stub, prompt, echo=True, max_tokens=0, logprobs=True, **GREEDY)
    assert texts(zero)[0] == prompt and zero[-1].usage.completion_tokens == 0
    assert [lp.logprob for c in zero for ch in c.choices for lp in ch.logprobs][1:] == \
        pytest.approx([lp.logprob for lp in lps[1:prompt_tokens]], abs=1e-4)


async def test_adapter_changes_output_and_unknown_adapter_is_rejected(stub):
    prompt = "Write a short poem about the sea."
    base = await complete(stub, prompt, max_tokens=8, logprobs=True, **GREEDY)
    styled = await complete(stub, prompt, adapter="styled", max_tokens=8, logprobs=True, **GREEDY)
    base_lps = [lp.logprob for c in base for ch in c.choices for lp in ch.logprobs]
    styled_lps = [lp.logprob for c in styled for ch in c.choices for lp in ch.logprobs]
    assert texts(base) != texts(styled) or base_lps != pytest.approx(styled_lps, abs=1e-3)
    code, _, msg = await rpc_error(complete(stub, prompt, adapter="nope", max_tokens=2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "adapter" in msg


async def test_engine_rejections_are_invalid_argument(stub):
    code, reason, msg = await rpc_error(complete(stub, "Hello", max_tokens=100000))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "maximum context length" in msg
    assert reason == "ENGINE_REJECTED_REQUEST"
    code, _, msg = await rpc_error(complete(stub, "Hello", max_tokens=2, top_p=0.0))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "top_p" in msg
    code, _, msg = await rpc_error(chat(stub, "x", max_tokens=-1))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _, msg = await rpc_error(complete(stub, "", max_tokens=2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "prompt" in msg


async def test_sixteen_concurrent_streams_all_complete(stub):
    results = await asyncio.gather(*(
        complete(stub, f"Question {i}: what is two plus two?", max_tokens=8, temperature=0.8, seed=i)
        for i in range(16)))
    for chunks in results:
        assert set(finish_reasons(chunks)) == {0}
        assert chunks[-1].usage.completion_tokens >= 1


async def test_tokenize_and_embed(stub):
    tok = await stub.Tokenize(pb.TokenizeRequest(deployment=DEPLOYMENT, prompt="Hello world"))
    assert len(tok.tokens) >= 2 and tok.max_model_len == 512
    chat_tok = await stub.Tokenize(pb.TokenizeRequest(
        deployment=DEPLOYMENT, messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="Hello world")],
        add_generation_prompt=True))
    assert len(chat_tok.tokens) > len(tok.tokens)
    emb = await stub.Embed(pb.EmbedRequest(deployment=DEPLOYMENT, inputs=["Hello world", "the sea is blue"]))
    assert [e.index for e in emb.embeddings] == [0, 1]
    assert len(emb.embeddings[0].values) == 64 and emb.usage.prompt_tokens > 0
    assert sum(v * v for v in emb.embeddings[0].values) == pytest.approx(1.0, abs=1e-4)
    short = await stub.Embed(pb.EmbedRequest(deployment=DEPLOYMENT, inputs=["Hello world"], dimensions=8))
    assert len(short.embeddings[0].values) == 8


async def test_cancelled_stream_aborts_the_engine_request(stub):
    d = await stub.GetDeployment(pb.GetDeploymentRequest(name=DEPLOYMENT))
    call = stub.Complete(pb.CompleteRequest(deployment=DEPLOYMENT, prompt="Tell me a story",
                                            sampling=pb.SamplingParams(max_tokens=400, temperature=1.0)))
    seen = 0
    async for _chunk in call:
        seen += 1
        if seen == 3:
            break
    call.cancel()
    async with httpx.AsyncClient(base_url=d.engine_endpoints[0]) as http:
        deadline = time.monotonic() + 60
        while (await http.get("/health")).json()["running"] != 0:
            assert time.monotonic() < deadline, "the engine kept generating for a cancelled call"
            await asyncio.sleep(0.05)


async def test_load_and_unload_adapter_at_runtime(stub, registry, versions):
    d = await stub.LoadAdapter(pb.LoadAdapterRequest(name=DEPLOYMENT, adapter=pb.Adapter(
        alias="other", model_version=versions["lora2"])))
    assert [a.alias for a in d.adapters] == ["styled", "other"]
    other = texts(await complete(stub, "The sea", adapter="other", max_tokens=4, **GREEDY))
    assert 0 in other
    code, _, _ = await rpc_error(stub.LoadAdapter(pb.LoadAdapterRequest(name=DEPLOYMENT, adapter=pb.Adapter(
        alias="other", model_version=versions["lora2"]))))
    assert code == grpc.StatusCode.ALREADY_EXISTS
    v = await registry.GetModelVersion(rpb.GetModelVersionRequest(name=versions["lora2"]))
    assert DEPLOYMENT in v.deployed_by
    d = await stub.UnloadAdapter(pb.UnloadAdapterRequest(name=DEPLOYMENT, alias="other"))
    assert [a.alias for a in d.adapters] == ["styled"]
    code, _, _ = await rpc_error(complete(stub, "The sea", adapter="other", max_tokens=2))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    code, _, _ = await rpc_error(stub.UnloadAdapter(pb.UnloadAdapterRequest(name=DEPLOYMENT, alias="other")))
    assert code == grpc.StatusCode.NOT_FOUND


CLI = ("import sys, typer\n"
       "from cli.inference_cmds import chat, deploy_app, deployments_app\n"
       "app = typer.Typer()\n"
       "app.add_typer(deploy_app, name='deploy')\n"
       "app.add_typer(deployments_app, name='deployments')\n"
       "app.command('chat')(chat)\n"
       "app(args=sys.argv[1:])\n")


async def run_cli(service, *args: str) -> tuple[int, str, str]:
    env = {**os.environ, "YARD_INFERENCE_ADDR": f"127.0.0.1:{service['app'].server.port}", "COLUMNS": "200"}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", CLI, *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await proc.communicate()
    return proc.returncode, out.decode(), err.decode()


async def test_cli_lists_shows_and_chats(service):
    rc, out, err = await run_cli(service, "deployments", "list")
    assert rc == 0, err
    assert "tiny" in out and "READY" in out and "styled" in out
    rc, out, err = await run_cli(service, "chat", "tiny", "-m", "Hello", "--max-tokens", "3", "--temperature", "0")
    expected = texts(await chat(service["stub"], "Hello", max_tokens=3, **GREEDY), "content")[0]
    assert rc == 0 and out == expected + "\n", err
    rc, out, err = await run_cli(service, "deployments", "show", "nope")
    assert rc == 1 and "deployments/nope not found" in err and "Traceback" not in err


# ----------------------------------------------------------------------------- failures and restarts (last)


def _gate_engine_starts(deployments, gate: asyncio.Event):
    """Engines made from now on start only once ``gate`` is set (the engines stay real): the test sees
    the deployment DEGRADED for as long as it needs, not for however long a restart happens to take.
    Returns the original factory, to put back."""
    original = deployments.engine_factory

    def gated(kind, spec):
        engine = original(kind, spec)
        start = engine.start

        async def start_when_let():
            await gate.wait()
            await start()

        engine.start = start_when_let
        return engine

    deployments.engine_factory = gated
    return original


async def test_killed_engine_ends_stream_unavailable_then_recovers(service, stub):
    app = service["app"]
    restart = asyncio.Event()
    original_factory = _gate_engine_starts(app.deployments, restart)
    try:
        call = stub.Complete(pb.CompleteRequest(deployment=DEPLOYMENT, prompt="Tell me a story",
                                                sampling=pb.SamplingParams(max_tokens=400, temperature=1.0)))
        pids = app.deployments.engine_pids(DEPLOYMENT)
        assert pids
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _chunk in call:
                if pids:
                    os.kill(pids.pop(), signal.SIGKILL)
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        degraded = await wait_state(stub, DEPLOYMENT, {pb.DEPLOYMENT_STATE_DEGRADED})
        assert degraded.error.message and "exited" in degraded.error.message
        code, reason, _ = await rpc_error(complete(stub, "Hello", max_tokens=1))
        assert code == grpc.StatusCode.UNAVAILABLE and reason == "DEPLOYMENT_NOT_READY"
    finally:
        app.deployments.engine_factory = original_factory
        restart.set()
    await wait_state(stub, DEPLOYMENT, {pb.DEPLOYMENT_STATE_READY}, timeout=120)
    assert texts(await complete(stub, "Hello", max_tokens=2, **GREEDY))


async def test_restarted_service_redeploys_stored_deployments(service, workdir, module_s3, registry):
    await service["channel"].close()
    await service["app"].stop(grace=1)
    app = build_inference(inference_settings(workdir, module_s3, registry.addr), metrics=False, default_port=0)
    await app.start()
    channel = make_channel(f"127.0.0.1:{app.server.port}", default_timeout_s=120)
    service.update(app=app, channel=channel, stub=inference_pb2_grpc.InferenceServiceStub(channel))
    stub = service["stub"]
    d = await wait_state(stub, DEPLOYMENT, {pb.DEPLOYMENT_STATE_READY}, timeout=120)
    assert [a.alias for a in d.adapters] == ["styled"]
    assert texts(await complete(stub, "Hello", adapter="styled", max_tokens=2, **GREEDY))


async def test_undeploy_stops_the_engine_and_removes_the_marker(service, registry, versions):
    stub = service["stub"]
    pids = service["app"].deployments.engine_pids(DEPLOYMENT)
    gone = await stub.Undeploy(pb.UndeployRequest(name=DEPLOYMENT))
    assert gone.state == pb.DEPLOYMENT_STATE_DELETING
    code, _, _ = await rpc_error(stub.GetDeployment(pb.GetDeploymentRequest(name=DEPLOYMENT)))
    assert code == grpc.StatusCode.NOT_FOUND
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    base = await registry.GetModelVersion(rpb.GetModelVersionRequest(name=versions["base"]))
    assert DEPLOYMENT not in base.deployed_by
    code, _, _ = await rpc_error(complete(stub, "Hello", max_tokens=1))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_adapter_fixture_has_nonzero_lora_b(workdir, versions):
    from safetensors import safe_open

    with safe_open(str(workdir / "lora" / "adapter_model.safetensors"), "pt") as f:
        b = [f.get_tensor(k) for k in f.keys() if "lora_B" in k]  # noqa: SIM118 - safe_open, not a dict
    assert b and all(float(t.abs().sum()) > 0 for t in b)
    assert json.loads((workdir / "lora" / "adapter_config.json").read_text())["r"] == 4


async def test_engine_server_paces_a_stream_under_load_without_changing_it(workdir, versions):
    """The transformers engine's own pacing (the service passes its rule): a streamed answer comes in
    fewer, merged SSE events — first at once —, with the same text and tokens as unpaced. The interval
    (400 ms) is far above a token's time, so merging does not depend on how busy the machine is."""
    port = _free_port()
    log = (workdir / "paced-engine.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "services.inference.engines.transformers_server", "--model", str(workdir / "tiny"),
        "--port", str(port), "--served-model-name", "tiny", "--stream-interval-ms", "400",
        "--stream-max-interval-ms", "400", "--stream-pacing-min-streams", "1", stdout=log, stderr=log,
        env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=60) as client:
            deadline = time.monotonic() + 120
            while True:
                with contextlib.suppress(httpx.HTTPError):
                    if (await client.get("/health")).status_code == 200:
                        break
                assert time.monotonic() < deadline, (workdir / "paced-engine.log").read_text()[-2000:]
                await asyncio.sleep(0.2)
            body = {"model": "tiny", "prompt": "Once upon a time", "max_tokens": 48, "temperature": 0,
                    "ignore_eos": True, "logprobs": 1}
            whole = (await client.post("/v1/completions", json=body)).json()["choices"][0]
            events, started, first_at = [], time.monotonic(), None
            async with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as resp:
                async for line in resp.aiter_lines():
                    if line.startswith("data: {"):
                        first_at = first_at or time.monotonic() - started
                        events.append(json.loads(line[6:])["choices"][0])
            took = time.monotonic() - started
    finally:
        proc.terminate()
        await proc.wait()
        log.close()
    assert "".join(e["text"] for e in events) == whole["text"]
    tokens = [t for e in events for t in e["logprobs"]["tokens"]]
    assert tokens == whole["logprobs"]["tokens"] and len(tokens) == 48
    assert events[-1]["finish_reason"] == "length"
    # at most one event per 400 ms after the first (plus the last, sent at once), not one per token
    assert len(events) <= 2 + took / 0.4, (len(events), took)
    assert len(events) < 48
    assert first_at < took
