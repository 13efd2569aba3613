"""The OpenAI files and fine-tuning API of the gateway, driven by the official ``openai`` client over a real
stack: nanio S3, the registry and the training service (its worker runs real LoRA SFT / DPO recipes in
child processes), the inference service with the transformers engine serving a tiny random model
deployed as ``tiny``, and the gateway under uvicorn.

One flow: a file uploaded through ``files.create`` becomes a registry dataset; ``fine_tuning.jobs.create``
trains on it; its events are followed to ``succeeded``; the adapter is then loaded on the ``tiny``
deployment by the gateway, and ``chat.completions.create(model=job.fine_tuned_model)`` answers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from cli.demo_models import build_tiny_model
from gateway.app import create_app
from gateway.settings import GatewaySettings
from modelyard.inference.v1 import inference_pb2 as pb
from modelyard.registry.v1 import registry_pb2 as rpb
from services.core.artifacts import S3ArtifactStore
from tests.support.fake_inference import BackgroundLoop, GatewayServer
from tests.support.inprocess_stack import deploy_ready, inference_service, s3_bucket
from tests.support.training_stack import training_stack

pytestmark = [pytest.mark.timeout(600)]

ADMIN = "admin-fine-tuning"
CHAT_ROWS = [
    {
        "messages": [
            {"role": "system", "content": "Answer in capitals."},
            {"role": "user", "content": f"say {w}"},
            {"role": "assistant", "content": w.upper()},
        ]
    }
    for w in ("yes", "no", "maybe", "later")
]
DPO_ROWS = [
    {
        "input": {"messages": [{"role": "user", "content": f"greet {w}"}]},
        "preferred_output": [{"role": "assistant", "content": f"Hello {w}!"}],
        "non_preferred_output": [{"role": "assistant", "content": f"go away {w}"}],
    }
    for w in ("ann", "bob", "cy", "dee")
]


def jsonl(rows: list) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, s3_server) -> Iterator[dict]:
    bg = BackgroundLoop()
    work = tmp_path_factory.mktemp("fine-tuning")
    s3 = s3_bucket(s3_server)
    services = training_stack(work, s3, worker_slots=2)  # the SFT and the DPO job run side by side
    st = bg.run(services.__aenter__(), timeout=120)
    try:
        model_dir = build_tiny_model(work / "tiny")
        S3ArtifactStore.connect(s3).upload_dir("uploads/tiny/base", model_dir)
        version = bg.run(
            st.registry.create_model_version(
                parent="models/tiny",
                version_id="base",
                model_version=rpb.ModelVersion(artifact_prefix="uploads/tiny/base"),
            )
        )
        registry_addr = st.registry.target
        with inference_service(bg, work, s3, registry_addr) as (inference_addr, inference_client):
            deployment = pb.Deployment(
                model_version=version.name, engine=pb.ENGINE_TRANSFORMERS, served_model_name="tiny"
            )
            bg.run(deploy_ready(inference_client, deployment, "tiny"), timeout=330)
            gw = GatewayServer(
                bg,
                create_app(
                    GatewaySettings(
                        data_dir=work / "gateway",
                        inference_addr=inference_addr,
                        registry_addr=registry_addr,
                        training_addr=st.training_addr,
                        admin_token=ADMIN,
                        log_json=False,
                        console={"enabled": False},
                        routing={"refresh_interval_s": 0.5},
                        fine_tuning={"monitor_interval_s": 0.5},
                    )
                ),
            )
            gw.wait_started()
            admin = httpx.Client(base_url=gw.url, headers={"authorization": f"Bearer {ADMIN}"}, timeout=30)
            try:
                assert admin.post("/admin/projects", json={"name": "other", "models": ["*"]}).status_code == 201
                keys = {
                    p: admin.post("/admin/keys", json={"name": p, "project": p}).json()["key"]
                    for p in ("default", "other")
                }
                yield {"url": gw.url, "keys": keys, "inference": inference_client, "bg": bg}
            finally:
                admin.close()
                gw.stop()
    finally:
        bg.run(services.__aexit__(None, None, None), timeout=60)
        bg.close()


def sdk(stack: dict, project: str = "default") -> openai.OpenAI:
    return openai.OpenAI(base_url=stack["url"] + "/v1", api_key=stack["keys"][project], max_retries=0, timeout=60)


def bad_request(call) -> dict:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    return info.value.body


def test_files_are_validated_stored_listed_and_private_to_their_project(stack):
    client = sdk(stack)
    content = jsonl(CHAT_ROWS)
    created = client.files.create(file=("chat rows.jsonl", content), purpose="fine-tune")
    assert (created.object, created.purpose, created.status, created.bytes, created.filename) == (
        "file",
        "fine-tune",
        "processed",
        len(content),
        "chat rows.jsonl",
    )
    assert created.id.startswith("file-")
    assert client.files.retrieve(created.id).model_dump() == created.model_dump()
    assert client.files.content(created.id).read() == content
    listed = client.files.list(purpose="fine-tune")
    assert created.id in [f.id for f in listed.data]
    # a bad row refuses the whole file, naming its line and field
    rows = [*CHAT_ROWS[:2], {"messages": [{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]}]
    body = bad_request(lambda: client.files.create(file=("bad.jsonl", jsonl(rows)), purpose="fine-tune"))
    assert body["param"] == "file" and body["code"] == "invalid_file_format", body
    assert "line 3: messages[1].role: unknown role 'robot'" in body["message"], body
    body = bad_request(lambda: client.files.create(file=("x.jsonl", b'{"messages": [\n'), purpose="fine-tune"))
    assert "line 1: invalid JSON" in body["message"], body
    bad_dpo = [{**DPO_ROWS[0], "preferred_output": [{"role": "user", "content": "hi"}]}]
    body = bad_request(lambda: client.files.create(file=("d.jsonl", jsonl(bad_dpo)), purpose="fine-tune"))
    assert "line 1: preferred_output[0].role: must be 'assistant'" in body["message"], body
    body = bad_request(lambda: client.files.create(file=("x.jsonl", content), purpose="batch"))
    assert body["param"] == "purpose", body
    # another project sees nothing
    other = sdk(stack, "other")
    with pytest.raises(openai.NotFoundError):
        other.files.retrieve(created.id)
    assert created.id not in [f.id for f in other.files.list().data]
    # delete
    spare = client.files.create(file=("spare.jsonl", content), purpose="fine-tune")
    page = client.files.list(limit=1)
    assert page.has_more and page.data[0].id == spare.id  # newest first
    assert client.files.delete(spare.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.files.retrieve(spare.id)
    stack["chat_file"] = created.id


def test_fine_tuning_job_runs_to_succeeded_and_its_model_answers(stack):
    client = sdk(stack)
    training_file = (
        stack.get("chat_file") or client.files.create(file=("chat.jsonl", jsonl(CHAT_ROWS)), purpose="fine-tune").id
    )
    dpo_file = client.files.create(file=("prefs.jsonl", jsonl(DPO_ROWS)), purpose="fine-tune").id
    # refusals name the parameter
    with pytest.raises(openai.NotFoundError) as info:
        client.fine_tuning.jobs.create(model="tiny", training_file="file-nope")
    assert info.value.body["param"] == "training_file"
    with pytest.raises(openai.NotFoundError) as info:
        client.fine_tuning.jobs.create(model="nope", training_file=training_file)
    assert info.value.body["param"] == "model"
    body = bad_request(
        lambda: client.fine_tuning.jobs.create(
            model="tiny", training_file=training_file, hyperparameters={"n_epochs": 0}
        )
    )
    assert body["param"] == "hyperparameters.n_epochs", body
    body = bad_request(
        lambda: client.fine_tuning.jobs.create(model="tiny", training_file=training_file, method={"type": "dpo"})
    )
    assert body["param"] == "training_file", body

    job = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=training_file,
        suffix="caps",
        seed=7,
        metadata={"team": "a"},
        method={"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 1, "batch_size": 2}}},
    )
    assert (job.object, job.status, job.model, job.training_file, job.seed) == (
        "fine_tuning.job",
        "queued",
        "tiny",
        training_file,
        7,
    )
    assert job.method.supervised.hyperparameters.n_epochs == 1
    assert job.method.supervised.hyperparameters.batch_size == 2
    dpo = client.fine_tuning.jobs.create(
        model="tiny",
        training_file=dpo_file,
        method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1, "batch_size": 2, "beta": 0.2}}},
    )
    assert dpo.method.type == "dpo" and dpo.method.dpo.hyperparameters.beta == 0.2
    spare = client.fine_tuning.jobs.create(model="tiny", training_file=training_file)
    cancelled = client.fine_tuning.jobs.cancel(spare.id)  # queued behind the two others: cancelled at once
    assert cancelled.status == "cancelled", cancelled
    with pytest.raises(openai.NotFoundError):
        sdk(stack, "other").fine_tuning.jobs.retrieve(job.id)

    messages = follow_events(client, job.id, "The job has successfully completed", timeout=150)
    assert "Fine-tuning job started" in messages and any(m.startswith("Step ") for m in messages), messages
    done = client.fine_tuning.jobs.retrieve(job.id)
    assert done.status == "succeeded", done
    assert done.fine_tuned_model and done.fine_tuned_model.startswith("tiny:ft-caps-"), done
    assert done.trained_tokens and done.trained_tokens > 0 and done.finished_at, done
    metrics = [e for e in client.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
    assert metrics and "train_loss" in metrics[0].data, metrics
    checkpoints = client.fine_tuning.jobs.checkpoints.list(job.id).data
    assert checkpoints and checkpoints[0].step_number >= 1 and checkpoints[0].fine_tuning_job_id == job.id
    assert checkpoints[0].metrics.step == checkpoints[0].step_number
    page = client.fine_tuning.jobs.list(limit=2)
    assert [j.id for j in page.data] == [spare.id, dpo.id] and page.has_more
    assert {j.id for j in client.fine_tuning.jobs.list(metadata={"team": "a"}).data} == {job.id}

    answer = client.chat.completions.create(
        model=done.fine_tuned_model, max_tokens=4, messages=[{"role": "user", "content": "say yes"}]
    )
    assert answer.model == done.fine_tuned_model and answer.choices[0].message.content is not None
    assert done.fine_tuned_model in [m.id for m in client.models.list().data]

    follow_events(client, dpo.id, "The job has successfully completed", timeout=150)
    finished = client.fine_tuning.jobs.retrieve(dpo.id)
    assert finished.status == "succeeded" and finished.fine_tuned_model.startswith("tiny:ft-"), finished
    assert client.fine_tuning.jobs.retrieve(spare.id).status == "cancelled"
    body = bad_request(lambda: client.fine_tuning.jobs.cancel(job.id))
    assert "already succeeded" in body["message"], body


def follow_events(client: openai.OpenAI, job_id: str, last: str, timeout: float) -> list[str]:
    """The job's event messages, oldest first, once ``last`` is among them."""
    deadline = time.monotonic() + timeout
    while True:
        events = list(client.fine_tuning.jobs.list_events(job_id, limit=100))
        messages = [e.message for e in reversed(events)]
        if last in messages:
            return messages
        failed = [m for m in messages if m.startswith("Fine-tuning job failed")]
        assert not failed, failed
        assert time.monotonic() < deadline, f"{job_id}: no {last!r} after {timeout}s: {messages}"
        time.sleep(0.5)
