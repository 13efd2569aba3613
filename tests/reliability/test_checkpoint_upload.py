"""An attempt SIGKILLed while it uploads a checkpoint: the next attempt resumes from the newest complete
checkpoint (its manifest is written last), removes the partial one, and the job ends with the parameters of an
uninterrupted run.

The job talks to the real S3 server through a relay that holds the upload at a chosen request (the manifest
PUT of one checkpoint, the middle of a file of another) while the test kills the attempt's process.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import time

from services.core.artifacts import S3ArtifactStore
from services.core.jobs import JobState, Worker
from services.training.recipes.checkpoints import (
    checkpoint_prefix,
    complete_checkpoints,
    download_latest,
    remove_partial,
)
from tests.integration.test_recipes import job_env
from tests.reliability.relay import Relay
from tests.reliability.training import EVERY, FAST, MAX_STEPS, TARGET, adapter, attempts, max_abs_diff, train_spec

TOLERANCE = 1e-5


def objects_of(store: S3ArtifactStore, prefix: str) -> list[str]:
    return [o.key.removeprefix(prefix + "/") for o in store.list(prefix)]


async def test_attempt_killed_while_uploading_a_checkpoint_resumes_from_the_newest_complete_one(
        jobs, store, s3_server, s3_settings, tiny_model, small_dataset, tmp_path):
    relay = await Relay(s3_server.host, s3_server.port).start()
    spec = train_spec(s3_settings, store, tiny_model, small_dataset)
    name, jid = "trainingJobs/upload-killed", "upload-killed"

    def put(step: int, rest: bytes) -> bytes:
        return b"PUT " + re.escape(f"/{s3_settings.bucket}/{checkpoint_prefix(name, step)}/".encode()) + rest

    kills = [  # (step of the checkpoint, where its upload stops)
        (8, relay.tap(put(8, rb"manifest\.json"))),  # every file stored, the manifest not
        (16, relay.tap(put(16, rb"files/optimizer\.pt"), after_bytes=4096)),  # in the middle of a file
    ]
    jobs.create("train", spec, name="trainingJobs/straight")
    jobs.create("train", {**spec, "s3": {**spec["s3"], "endpoint": relay.endpoint}}, name=name)
    worker = Worker(jobs, {"train": TARGET}, "w", tmp_path / "work", slots=2, child_env=job_env(s3_settings), **FAST)
    start = time.monotonic()
    partial: dict[int, list[str]] = {}
    await worker.start()
    try:
        for step, tap in kills:
            await asyncio.wait_for(tap.hit.wait(), 300)
            os.kill((await asyncio.to_thread(jobs.get, name)).child_pid, signal.SIGKILL)
            prefix = checkpoint_prefix(name, step)
            partial[step] = await asyncio.to_thread(objects_of, store, prefix)
            relay.release()
        deadline = time.monotonic() + 300
        while (await asyncio.to_thread(jobs.get, name)).state not in (JobState.SUCCEEDED, JobState.FAILED) or \
                (await asyncio.to_thread(jobs.get, "trainingJobs/straight")).state == JobState.RUNNING:
            assert time.monotonic() < deadline, "jobs did not finish"
            await asyncio.sleep(0.1)
    finally:
        await worker.stop()
        await relay.stop()
    elapsed = time.monotonic() - start

    job, straight = jobs.get(name), jobs.get("trainingJobs/straight")
    assert (job.state, straight.state) == (JobState.SUCCEEDED, JobState.SUCCEEDED), (job.error, straight.error)
    # at the kill, step 8 had all its files but no manifest; step 16 only the files before optimizer.pt
    assert "manifest.json" not in partial[8] and "files/trainer_state.json" in partial[8], partial[8]
    assert partial[16] and "manifest.json" not in partial[16] and "files/trainer_state.json" not in partial[16]
    runs = attempts(jobs, name)
    assert [(a.number, a.resumed_from) for a in runs] == [(1, None), (2, 4), (3, 12)]
    assert [a.last_step for a in runs[:2]] == [8, 16]
    for a in runs[1:]:
        assert a.trained[0] == a.resumed_from + 1
    removed = [e.data["step"] for e in jobs.events(name, limit=100_000) if e.message == "partial checkpoint removed"]
    assert removed == [8, 16]
    assert [s for s, _ in complete_checkpoints(store, name)] == list(range(EVERY, MAX_STEPS + 1, EVERY))
    assert [c["step"] for c in job.outputs["checkpoints"]] == list(range(EVERY, MAX_STEPS + 1, EVERY))
    keys = objects_of(store, f"training/{jid}/checkpoints")
    assert {k.split("/")[0] for k in keys} == {k.split("/")[0] for k in keys if k.endswith("/manifest.json")}
    diff = max_abs_diff(adapter(store, straight.outputs, tmp_path / "a"), adapter(store, job.outputs, tmp_path / "b"))
    print(f"\nkilled uploading step 8 (manifest held) and step 16 (optimizer.pt half sent): resumed from 4 and 12, "
          f"partial checkpoints removed {removed}; adapter max |diff| {diff:.2g}; {elapsed:.1f}s")
    assert diff <= TOLERANCE


def test_resume_skips_partial_and_unusable_checkpoints_and_removes_them(store, tmp_path):
    """Without training: checkpoints 4 (complete), 8 (complete, but a file changed since its manifest),
    12 (files, no manifest). Resume takes 4; 8 and 12 are gone afterwards."""
    name = "trainingJobs/fabricated"
    for step in (4, 8):
        folder = tmp_path / f"c{step}"
        folder.mkdir()
        (folder / "weights.bin").write_bytes(bytes([step]) * 1000)
        (folder / "trainer_state.json").write_text(f'{{"global_step": {step}}}')
        store.upload_dir(checkpoint_prefix(name, step), folder)
    store.put_bytes(f"{checkpoint_prefix(name, 8)}/files/weights.bin", b"not what the manifest says")
    store.put_bytes(f"{checkpoint_prefix(name, 12)}/files/weights.bin", b"half an upload")
    logged: list[tuple[str, dict]] = []

    def log(message: str, **fields) -> None:
        logged.append((message, fields))

    assert remove_partial(store, name, log) == [12]
    step, prefix, path = download_latest(store, name, tmp_path / "resume", log)
    assert (step, prefix) == (4, checkpoint_prefix(name, 4))
    assert (path / "weights.bin").read_bytes() == bytes([4]) * 1000
    assert [m for m, _ in logged] == ["partial checkpoint removed", "unusable checkpoint removed"]
    assert logged[1][1]["step"] == 8 and "sha256" in logged[1][1]["error"]
    assert complete_checkpoints(store, name) == [(4, checkpoint_prefix(name, 4))]
    assert objects_of(store, f"training/{name.split('/')[1]}/checkpoints") == [
        "step-00000004/files/trainer_state.json", "step-00000004/files/weights.bin", "step-00000004/manifest.json"]
    assert not (tmp_path / "resume" / "checkpoint-8").exists()
