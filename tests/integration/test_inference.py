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

import httpx
import pytest
import pytest_asyncio

from cli.demo_models import build_tiny_model
from modelyard.client import (
    AlreadyExists,
    DomainError,
    FailedPrecondition,
    InferenceClient,
    InvalidArgument,
    NotFound,
    RegistryClient,
    Unavailable,
)
from modelyard.inference.v1 import inference_pb2 as pb
from modelyard.registry.v1 import registry_pb2 as rpb
from services.core.artifacts import S3ArtifactStore
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


async def fails(awaitable, error: type[DomainError]) -> DomainError:
    """Await ``awaitable`` expecting the SDK to raise ``error`` (its gRPC code); the error."""
    with pytest.raises(error) as info:
        await awaitable
    return info.value


async def wait_state(inference: InferenceClient, name: str, states: set[int], timeout: float = 120) -> pb.Deployment:
    deadline = time.monotonic() + timeout
    while True:
        d = await inference.get_deployment(name)
        if d.state in states:
            return d
        if time.monotonic() > deadline:
            raise AssertionError(f"{name} stayed {pb.DeploymentState.Name(d.state)}: {d.error.message}")
        await asyncio.sleep(0.2)


async def chat(inference: InferenceClient, content: str, **kw) -> list[pb.ChatChunk]:
    adapter = kw.pop("adapter", "")
    stream = inference.chat(deployment=DEPLOYMENT, adapter=adapter,
                            messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content=content)],
                            sampling=pb.SamplingParams(**kw))
    return [c async for c in stream]


async def complete(inference: InferenceClient, prompt: str, echo: bool = False, adapter: str = "",
                   **kw) -> list[pb.CompleteChunk]:
    stream = inference.complete(deployment=DEPLOYMENT, prompt=prompt, echo=echo, adapter=adapter,
                                sampling=pb.SamplingParams(**kw))
    return [c async for c in stream]


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
    client = RegistryClient(f"127.0.0.1:{app.server.port}", timeout=60)
    yield client
    await client.close()
    await app.stop(grace=1)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def versions(workdir, module_s3, registry) -> dict[str, str]:
    """A tiny base model and two LoRA adapters registered in the registry."""
    store = S3ArtifactStore.connect(module_s3)
    model_dir = build_tiny_model(workdir / "tiny")
    store.upload_dir("uploads/tiny/base", model_dir)
    base = await registry.create_model_version(
        parent="models/tiny", version_id="base", model_version=rpb.ModelVersion(artifact_prefix="uploads/tiny/base"))
    out = {"base": base.name}
    for key, seed in (("lora", 1), ("lora2", 2)):
        adapter_dir = make_lora_adapter(model_dir, workdir / key, seed=seed)
        store.upload_dir(f"uploads/tiny-{key}/v1", adapter_dir)
        adapter = await registry.register_derived_version(
            parent=f"models/tiny-{key}", version_id="v1", kind=rpb.MODEL_KIND_ADAPTER,
            artifact_prefix=f"uploads/tiny-{key}/v1", lineage=rpb.Lineage(base_model_version=base.name))
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
    """The inference service with deployment ``tiny`` (base + adapter ``styled``) READY; {app, client}."""
    app = build_inference(inference_settings(workdir, module_s3, registry.target), metrics=False, default_port=0)
    await app.start()
    client = InferenceClient(f"127.0.0.1:{app.server.port}", timeout=120)
    created = await client.deploy(pb.Deployment(
        model_version=versions["base"], engine=pb.ENGINE_TRANSFORMERS,
        adapters=[pb.Adapter(alias="styled", model_version=versions["lora"])],
        options=pb.EngineOptions(max_num_seqs=32)), deployment_id="tiny")
    assert created.state == pb.DEPLOYMENT_STATE_CREATING
    await wait_state(client, DEPLOYMENT, {pb.DEPLOYMENT_STATE_READY, pb.DEPLOYMENT_STATE_FAILED})
    holder = {"app": app, "client": client}
    yield holder
    await holder["client"].close()
    await holder["app"].stop(grace=1)


@pytest.fixture
def inference(service) -> InferenceClient:
    return service["client"]


# ----------------------------------------------------------------------------- control plane


async def test_deploy_becomes_ready_and_marks_the_version(inference, registry, versions):
    d = await inference.get_deployment(DEPLOYMENT)
    assert d.state == pb.DEPLOYMENT_STATE_READY, d.error.message
    assert d.engine == pb.ENGINE_TRANSFORMERS and d.model_version == versions["base"]
    assert [a.alias for a in d.adapters] == ["styled"] and d.served_model_name == "tiny"
    assert d.engine_endpoints and d.engine_endpoints[0].startswith("http://127.0.0.1:")
    base = await registry.get_model_version(versions["base"])
    assert DEPLOYMENT in base.deployed_by
    listed = await inference.list_deployments(filter="state = DEPLOYMENT_STATE_READY")
    assert [x.name for x in listed.deployments] == [DEPLOYMENT]
    none = await inference.list_deployments(filter="state = DEPLOYMENT_STATE_FAILED")
    assert not none.deployments
    both = await inference.list_deployments(
        filter=f'engine = ENGINE_TRANSFORMERS AND model_version = "{versions["base"]}"', order_by="name desc")
    assert [x.name for x in both.deployments] == [DEPLOYMENT] and not both.next_page_token
    assert [x.name async for x in inference.iter_deployments(page_size=1)] == [DEPLOYMENT]


async def test_deploy_errors_name_the_problem(inference, versions):
    err = await fails(inference.deploy(pb.Deployment(
        model_version="models/tiny/versions/missing", engine=pb.ENGINE_TRANSFORMERS)), NotFound)
    assert "models/tiny/versions/missing" in err.message, err.message
    err = await fails(inference.deploy(pb.Deployment(model_version=versions["base"])), InvalidArgument)
    assert "deployment.engine" in err.message
    assert "deployment.engine" in {v.field for v in err.violations}, err.violations
    err = await fails(inference.deploy(pb.Deployment(model_version=versions["base"], engine=pb.ENGINE_VLLM)),
                      FailedPrecondition)
    assert err.reason == "ENGINE_NOT_INSTALLED"
    assert "vLLM engine not installed: run make engine-vllm" in err.message
    await fails(inference.deploy(pb.Deployment(model_version=versions["base"], engine=pb.ENGINE_TRANSFORMERS),
                            deployment_id="tiny"), AlreadyExists)
    err = await fails(inference.deploy(pb.Deployment(model_version=versions["lora"], engine=pb.ENGINE_TRANSFORMERS)),
                      InvalidArgument)
    assert "is an adapter" in err.message
    await fails(inference.get_deployment("deployments/nope"), NotFound)
    err = await fails(inference.list_deployments(page_size=-1), InvalidArgument)
    assert "page_size" in err.message and [v.field for v in err.violations] == ["page_size"]
    err = await fails(inference.list_deployments(filter="colour = red"), InvalidArgument)
    assert "filter" in err.message and "colour" in err.message
    err = await fails(inference.list_deployments(order_by="engine"), InvalidArgument)
    assert "order_by" in err.message


# ----------------------------------------------------------------------------- data plane


async def test_chat_streams_deltas_then_usage(inference):
    chunks = await chat(inference, "What is the capital of France?", max_tokens=6, **GREEDY)
    assert len({c.id for c in chunks}) == 1
    deltas = [c for c in chunks if c.choices]
    assert deltas[0].choices[0].role == pb.CHAT_ROLE_ASSISTANT
    assert len(deltas) >= 2  # streamed, not one blob
    # the usage is on the last message only (on its own, or with the last deltas that came with it)
    assert [c.HasField("usage") for c in chunks] == [False] * (len(chunks) - 1) + [True]
    usage = chunks[-1].usage
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 6
    reason = finish_reasons(chunks)[0]
    assert reason == (pb.FINISH_REASON_LENGTH if usage.completion_tokens == 6 else pb.FINISH_REASON_STOP)
    again = await chat(inference, "What is the capital of France?", max_tokens=6, **GREEDY)
    assert texts(again, "content") == texts(chunks, "content")  # greedy is deterministic


async def test_completion_n2_max_tokens_and_seed(inference):
    chunks = await complete(inference, "The capital of France is", n=2, max_tokens=5, temperature=1.0, seed=7)
    out = texts(chunks)
    assert set(out) == {0, 1}
    reasons = finish_reasons(chunks)
    assert set(reasons) == {0, 1} and set(reasons.values()) <= {pb.FINISH_REASON_LENGTH, pb.FINISH_REASON_STOP}
    assert chunks[-1].usage.completion_tokens <= 10
    same = await complete(inference, "The capital of France is", n=2, max_tokens=5, temperature=1.0, seed=7)
    assert texts(same) == out  # a seed makes sampling reproducible
    one = await complete(inference, "The capital of France is", max_tokens=1, **GREEDY)
    assert finish_reasons(one) == {0: pb.FINISH_REASON_LENGTH} and one[-1].usage.completion_tokens == 1


async def test_stop_string_cuts_the_output(inference):
    full = texts(await complete(inference, "Hello! How can I", max_tokens=12, **GREEDY))[0]
    assert len(full) > 4
    stop = full[2:4]
    cut = await complete(inference, "Hello! How can I", max_tokens=12, stop=[stop], **GREEDY)
    assert texts(cut)[0] == full[: full.index(stop)]
    assert finish_reasons(cut) == {0: pb.FINISH_REASON_STOP}


async def test_logprobs_of_generated_tokens(inference):
    chunks = await chat(inference, "Hello", max_tokens=4, logprobs=True, top_logprobs=3, **GREEDY)
    logprobs = [lp for c in chunks for ch in c.choices for lp in ch.logprobs]
    assert len(logprobs) == chunks[-1].usage.completion_tokens or len(logprobs) == 4
    for lp in logprobs:
        assert lp.HasField("logprob") and lp.logprob <= 0
        assert len(lp.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert lp.logprob == pytest.approx(lp.top_logprobs[0].logprob, abs=1e-5)


async def test_echo_returns_prompt_logprobs_for_loglikelihood(inference):
    prompt = "The capital of France is Paris"
    chunks = await complete(inference, prompt, echo=True, max_tokens=1, logprobs=True, top_logprobs=1, **GREEDY)
    assert texts(chunks)[0].startswith(prompt)
    lps = [lp for c in chunks for ch in c.choices for lp in ch.logprobs]
    prompt_tokens = chunks[-1].usage.prompt_tokens
    assert len(lps) == prompt_tokens + 1
    assert not lps[0].HasField("logprob")  # nothing precedes the first token
    assert all(lp.HasField("logprob") and lp.logprob < 0 for lp in lps[1:])
    assert "".join(lp.token for lp in lps[:prompt_tokens]) == prompt
    zero = await complete(inference, prompt, echo=True, max_tokens=0, logprobs=True, **GREEDY)
    assert texts(zero)[0] == prompt and zero[-1].usage.completion_tokens == 0
    assert [lp.logprob for c in zero for ch in c.choices for lp in ch.logprobs][1:] == \
        pytest.approx([lp.logprob for lp in lps[1:prompt_tokens]], abs=1e-4)


async def test_adapter_changes_output_and_unknown_adapter_is_rejected(inference):
    prompt = "Write a short poem about the sea."
    base = await complete(inference, prompt, max_tokens=8, logprobs=True, **GREEDY)
    styled = await complete(inference, prompt, adapter="styled", max_tokens=8, logprobs=True, **GREEDY)
    base_lps = [lp.logprob for c in base for ch in c.choices for lp in ch.logprobs]
    styled_lps = [lp.logprob for c in styled for ch in c.choices for lp in ch.logprobs]
    assert texts(base) != texts(styled) or base_lps != pytest.approx(styled_lps, abs=1e-3)
    err = await fails(complete(inference, prompt, adapter="nope", max_tokens=2), InvalidArgument)
    assert "adapter" in err.message


async def test_engine_rejections_are_invalid_argument(inference):
    err = await fails(complete(inference, "Hello", max_tokens=100000), InvalidArgument)
    assert "maximum context length" in err.message
    assert err.reason == "ENGINE_REJECTED_REQUEST"
    err = await fails(complete(inference, "Hello", max_tokens=2, top_p=0.0), InvalidArgument)
    assert "top_p" in err.message
    await fails(chat(inference, "x", max_tokens=-1), InvalidArgument)
    err = await fails(complete(inference, "", max_tokens=2), InvalidArgument)
    assert "prompt" in err.message


async def test_sixteen_concurrent_streams_all_complete(inference):
    results = await asyncio.gather(*(
        complete(inference, f"Question {i}: what is two plus two?", max_tokens=8, temperature=0.8, seed=i)
        for i in range(16)))
    for chunks in results:
        assert set(finish_reasons(chunks)) == {0}
        assert chunks[-1].usage.completion_tokens >= 1


async def test_tokenize_and_embed(inference):
    tok = await inference.tokenize(deployment=DEPLOYMENT, prompt="Hello world")
    assert len(tok.tokens) >= 2 and tok.max_model_len == 512
    chat_tok = await inference.tokenize(
        deployment=DEPLOYMENT, messages=[pb.ChatMessage(role=pb.CHAT_ROLE_USER, content="Hello world")],
        add_generation_prompt=True)
    assert len(chat_tok.tokens) > len(tok.tokens)
    emb = await inference.embed(deployment=DEPLOYMENT, inputs=["Hello world", "the sea is blue"])
    assert [e.index for e in emb.embeddings] == [0, 1]
    assert len(emb.embeddings[0].values) == 64 and emb.usage.prompt_tokens > 0
    assert sum(v * v for v in emb.embeddings[0].values) == pytest.approx(1.0, abs=1e-4)
    short = await inference.embed(deployment=DEPLOYMENT, inputs=["Hello world"], dimensions=8)
    assert len(short.embeddings[0].values) == 8


async def test_cancelled_stream_aborts_the_engine_request(inference):
    d = await inference.get_deployment(DEPLOYMENT)
    stream = inference.complete(deployment=DEPLOYMENT, prompt="Tell me a story",
                           sampling=pb.SamplingParams(max_tokens=400, temperature=1.0))
    seen = 0
    async with contextlib.aclosing(stream):  # closing the stream early cancels the call
        async for _chunk in stream:
            seen += 1
            if seen == 3:
                break
    assert seen == 3
    async with httpx.AsyncClient(base_url=d.engine_endpoints[0]) as http:
        deadline = time.monotonic() + 60
        while (await http.get("/health")).json()["running"] != 0:
            assert time.monotonic() < deadline, "the engine kept generating for a cancelled call"
            await asyncio.sleep(0.05)


async def test_load_and_unload_adapter_at_runtime(inference, registry, versions):
    d = await inference.load_adapter(DEPLOYMENT, adapter=pb.Adapter(alias="other", model_version=versions["lora2"]))
    assert [a.alias for a in d.adapters] == ["styled", "other"]
    other = texts(await complete(inference, "The sea", adapter="other", max_tokens=4, **GREEDY))
    assert 0 in other
    await fails(inference.load_adapter(DEPLOYMENT, adapter=pb.Adapter(alias="other", model_version=versions["lora2"])),
                AlreadyExists)
    v = await registry.get_model_version(versions["lora2"])
    assert DEPLOYMENT in v.deployed_by
    d = await inference.unload_adapter(DEPLOYMENT, alias="other")
    assert [a.alias for a in d.adapters] == ["styled"]
    await fails(complete(inference, "The sea", adapter="other", max_tokens=2), InvalidArgument)
    await fails(inference.unload_adapter(DEPLOYMENT, alias="other"), NotFound)


async def test_adapters_loaded_at_the_same_time_are_both_kept(inference, versions):
    """Two LoadAdapters racing on one deployment (two fine-tuning jobs finishing together): each adds to what
    the other saved, so both stay listed and served (the second used to overwrite the first's record)."""
    loads = [inference.load_adapter(DEPLOYMENT, adapter=pb.Adapter(alias=a, model_version=versions["lora2"]))
             for a in ("twin-a", "twin-b")]
    await asyncio.gather(*loads)
    d = await inference.get_deployment(DEPLOYMENT)
    assert [a.alias for a in d.adapters] == ["styled", "twin-a", "twin-b"] or \
        [a.alias for a in d.adapters] == ["styled", "twin-b", "twin-a"]
    for alias in ("twin-a", "twin-b"):
        assert texts(await complete(inference, "The sea", adapter=alias, max_tokens=2, **GREEDY))
        await inference.unload_adapter(DEPLOYMENT, alias=alias)
    assert [a.alias for a in (await inference.get_deployment(DEPLOYMENT)).adapters] == ["styled"]


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
    expected = texts(await chat(service["client"], "Hello", max_tokens=3, **GREEDY), "content")[0]
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


async def test_killed_engine_ends_stream_unavailable_then_recovers(service, inference):
    app = service["app"]
    restart = asyncio.Event()
    original_factory = _gate_engine_starts(app.deployments, restart)
    try:
        stream = inference.complete(deployment=DEPLOYMENT, prompt="Tell me a story",
                               sampling=pb.SamplingParams(max_tokens=400, temperature=1.0))
        pids = app.deployments.engine_pids(DEPLOYMENT)
        assert pids
        with pytest.raises(Unavailable):  # the stream ends with UNAVAILABLE (generation is never retried)
            async for _chunk in stream:
                if pids:
                    os.kill(pids.pop(), signal.SIGKILL)
        degraded = await wait_state(inference, DEPLOYMENT, {pb.DEPLOYMENT_STATE_DEGRADED})
        assert degraded.error.message and "exited" in degraded.error.message
        err = await fails(complete(inference, "Hello", max_tokens=1), Unavailable)
        assert err.reason == "DEPLOYMENT_NOT_READY"
    finally:
        app.deployments.engine_factory = original_factory
        restart.set()
    await wait_state(inference, DEPLOYMENT, {pb.DEPLOYMENT_STATE_READY}, timeout=120)
    assert texts(await complete(inference, "Hello", max_tokens=2, **GREEDY))


async def test_restarted_service_redeploys_stored_deployments(service, workdir, module_s3, registry):
    await service["client"].close()
    await service["app"].stop(grace=1)
    app = build_inference(inference_settings(workdir, module_s3, registry.target), metrics=False, default_port=0)
    await app.start()
    service.update(app=app, client=InferenceClient(f"127.0.0.1:{app.server.port}", timeout=120))
    inference = service["client"]
    d = await wait_state(inference, DEPLOYMENT, {pb.DEPLOYMENT_STATE_READY}, timeout=120)
    assert [a.alias for a in d.adapters] == ["styled"]
    assert texts(await complete(inference, "Hello", adapter="styled", max_tokens=2, **GREEDY))


async def test_undeploy_stops_the_engine_and_removes_the_marker(service, registry, versions):
    inference = service["client"]
    pids = service["app"].deployments.engine_pids(DEPLOYMENT)
    gone = await inference.undeploy(DEPLOYMENT)
    assert gone.state == pb.DEPLOYMENT_STATE_DELETING
    await fails(inference.get_deployment(DEPLOYMENT), NotFound)
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
    base = await registry.get_model_version(versions["base"])
    assert DEPLOYMENT not in base.deployed_by
    await fails(complete(inference, "Hello", max_tokens=1), NotFound)


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
