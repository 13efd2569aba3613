"""Units of the gateway's OpenAI files and fine-tuning API (gateway/finetune/): row checks and conversion,
the hyperparameter mapping, and training events as OpenAI events."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

from gateway.finetune.files import DPO, SUPERVISED, check_rows
from gateway.finetune.jobs import Follow, _resolved, _spec_hyperparameters, map_event
from gateway.finetune.protocol import DpoHyperparameters, Hyperparameters
from modelyard.common.v1 import common_pb2 as cpb
from modelyard.training.v1 import training_pb2 as tpb
from services.core.errors import InvalidArgument

CHAT = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "HI", "weight": 1}]}
PREF = {"input": {"messages": [{"role": "user", "content": "hi"}]},
        "preferred_output": [{"role": "assistant", "content": "hello"}],
        "non_preferred_output": [{"role": "assistant", "content": "go"}]}


def check(tmp_path: Path, lines: list) -> tuple[str, int, list[dict]]:
    path = tmp_path / "f.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    out = io.StringIO()
    kind, rows = check_rows(path, "f.jsonl", out)
    return kind, rows, [json.loads(line) for line in out.getvalue().splitlines()]


def refused(tmp_path: Path, lines: list) -> InvalidArgument:
    with pytest.raises(InvalidArgument) as info:
        check(tmp_path, lines)
    assert info.value.reason == "INVALID_FILE_FORMAT" and info.value.violations[0].field == "file"
    return info.value


def test_chat_rows_are_kept_as_given(tmp_path):
    assert check(tmp_path, [CHAT, CHAT]) == (SUPERVISED, 2, [CHAT, CHAT])


def test_preference_rows_become_registry_preference_rows(tmp_path):
    kind, rows, out = check(tmp_path, [PREF])
    assert (kind, rows) == (DPO, 1)
    assert out == [{"messages": PREF["input"]["messages"], "chosen": PREF["preferred_output"],
                    "rejected": PREF["non_preferred_output"]}]


def test_every_bad_row_is_named_by_line_and_field(tmp_path):
    bad_role = {"messages": [{"role": "user", "content": "x"}, {"role": "robot", "content": "y"}]}
    err = refused(tmp_path, [CHAT, "", bad_role, "{nope", {"prompt": "x"}])
    assert "(3 of 4 rows are invalid)" in err.message
    assert "line 3: messages[1].role: unknown role 'robot'" in err.message  # blank line 2 still counts as a line
    assert "line 4: invalid JSON" in err.message
    assert 'line 5: must be a chat row {"messages": [...]}' in err.message


def test_preference_errors_use_the_openai_field_names(tmp_path):
    same = {**PREF, "non_preferred_output": PREF["preferred_output"]}
    err = refused(tmp_path, [{**PREF, "preferred_output": []}, same, {**PREF, "input": {"messages": "x"}}])
    assert "line 1: preferred_output: must be a list of exactly one assistant message" in err.message
    assert "line 2: non_preferred_output: must differ from chosen" in err.message
    assert "line 3: input.messages: must be a list of messages" in err.message


def test_one_kind_of_row_per_file_and_weight_zero_is_refused(tmp_path):
    err = refused(tmp_path, [CHAT, PREF])
    assert "line 2: a dpo row in a file of supervised rows" in err.message
    zero = {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "weight": 0}]}
    err = refused(tmp_path, [zero])
    assert "line 1: messages[1].weight: 0 (not training on this message) is not supported" in err.message


def test_an_empty_file_is_refused(tmp_path):
    assert "no rows" in refused(tmp_path, ["", " "]).message


@pytest.mark.parametrize(("batch", "micro", "accumulation"), [(1, 1, 1), (6, 6, 1), (16, 8, 2), (30, 6, 5), (17, 1, 17)])
def test_batch_size_is_the_global_batch(batch, micro, accumulation):
    hp = _spec_hyperparameters("supervised", Hyperparameters(batch_size=batch), None)
    assert (hp.batch_size, hp.gradient_accumulation_steps) == (micro, accumulation)


def test_auto_leaves_the_training_defaults_and_numbers_are_mapped():
    hp = _spec_hyperparameters("supervised", Hyperparameters(n_epochs="auto", learning_rate_multiplier="auto"), None)
    assert not hp.HasField("num_epochs") and not hp.HasField("learning_rate") and not hp.HasField("seed")
    hp = _spec_hyperparameters("dpo", DpoHyperparameters(n_epochs=3, learning_rate_multiplier=2.0, beta=0.3), 5)
    assert (hp.num_epochs, hp.learning_rate, hp.beta, hp.seed) == (3.0, pytest.approx(2e-4), 0.3, 5)
    job = tpb.TrainingJob(spec=tpb.TrainingJobSpec(hyperparameters=tpb.Hyperparameters(
        num_epochs=2.0, batch_size=4, gradient_accumulation_steps=4, learning_rate=5e-5, beta=0.1)))
    assert _resolved(job, "dpo") == {"n_epochs": 2, "batch_size": 16, "learning_rate_multiplier": 0.5, "beta": 0.1}


def event(seq: int, **payload) -> cpb.JobEvent:
    return cpb.JobEvent(sequence=seq, time=Timestamp(seconds=1_700_000_000), **payload)


def test_training_events_become_openai_events_at_stable_positions():
    follow = Follow()
    queued = map_event(event(1, state_change=cpb.JobStateChange(state=cpb.JOB_STATE_QUEUED)), follow)
    assert [(e.position, e.message) for e in queued] == [(20, "Files validated, moving job to queued state")]
    started = map_event(event(2, state_change=cpb.JobStateChange(previous_state=cpb.JOB_STATE_QUEUED,
                                                                 state=cpb.JOB_STATE_RUNNING)), follow)
    assert started[0].message == "Fine-tuning job started"
    assert map_event(event(3, metrics=cpb.JobMetrics(step=1, values={"total_steps": 4.0})), follow) == []
    loss = map_event(event(4, metrics=cpb.JobMetrics(step=1, values={"loss": 2.5, "learning_rate": 1e-4})), follow)
    assert (loss[0].type, loss[0].message, loss[0].data) == (
        "metrics", "Step 1/4: training loss=2.5000", {"step": 1, "train_loss": 2.5, "total_steps": 4, "learning_rate": 1e-4})
    saved = map_event(event(5, log=cpb.JobLogLine(line="checkpoint saved prefix=training/x step=4")), follow)
    assert (saved[0].position, saved[0].message, saved[0].data) == (60, "Checkpoint created at step 4", {"step": 4})
    assert map_event(event(6, log=cpb.JobLogLine(line="some warning stream=stderr")), follow) == []
    # the end is reported by the gateway once the adapter is deployed (FineTuning.finalize), not here
    done = cpb.JobStateChange(previous_state=cpb.JOB_STATE_RUNNING, state=cpb.JOB_STATE_SUCCEEDED)
    assert map_event(event(7, state_change=done), follow) == []
