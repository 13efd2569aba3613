"""Image rows in a custom evaluation set, without a running service: validation of ``images``, the chat
request an image row becomes (image parts then the question; multiple choice answered by generation), the
reply parsed to a choice, the images read from the extracted archive into the inference service's
``ChatMessage.parts`` and an endpoint's ``image_url`` parts, and a row whose image cannot be loaded named."""

from __future__ import annotations

import base64
import json
from pathlib import Path

import pytest

from cli.demo_vlm import write_shape_eval_set
from modelyard.inference.v1 import inference_pb2 as ipb
from services.core.datasets import iter_rows
from services.core.errors import InvalidArgument
from services.core.image_datasets import ImagePolicy, data_dir_for, extract_archive
from services.evaluation import benchmarks as bm
from services.evaluation.benchmarks.custom import MC_INSTRUCTION, parse_choice
from services.evaluation.job import _chat_message, _openai_message, _with_image_data, check_images

COLOURS = ["red", "green", "blue", "yellow"]


def _load(tmp_path: Path, fmt: str, n: int = 8) -> tuple[bm.Benchmark, list[dict], ImagePolicy]:
    archive = write_shape_eval_set(tmp_path / "set", n, seed=3, fmt=fmt)
    data = extract_archive(archive, tmp_path / "extracted")
    bench, issues = bm.custom_benchmark(iter_rows(data), name="custom:colours", field="dataset_version")
    assert issues == []
    return bench, bench.load(bm.DataSource(cache_dir=tmp_path)).test, ImagePolicy(base_dir=data_dir_for(data))


def test_an_image_multiple_choice_row_becomes_a_chat_generation_request(tmp_path):
    bench, docs, _ = _load(tmp_path, "multiple_choice")
    assert bench.with_images and bench.info.kind == "multiple_choice" and bench.info.metrics == ["acc"]
    req = bench.build(docs[0], 0, [], chat=False)  # images go as chat whatever apply_chat_template says
    assert isinstance(req, bm.GenRequest)
    assert req.images == [docs[0]["images"][0]] and req.images[0].startswith("images/")
    (turn,) = req.messages
    image, text = turn["content"]
    assert turn["role"] == "user" and image == {"type": "image", "image": req.images[0]}
    assert text["text"] == "\n".join(
        ["What colour is the shape?", "A. red", "B. green", "C. blue", "D. yellow", MC_INSTRUCTION]
    )
    assert req.reference == "ABCD"[docs[0]["answer"]] and req.max_tokens <= 16
    # A reply naming the right letter scores 1, another letter 0, an unparseable reply 0 (recorded as given).
    gold = docs[0]["answer"]
    right = bench.score(docs[0], req, bm.GenResult(texts=[f"{'ABCD'[gold]}. {COLOURS[gold]}"]))
    wrong = bench.score(docs[0], req, bm.GenResult(texts=["ABCD"[(gold + 1) % 4]]))
    junk = bench.score(docs[0], req, bm.GenResult(texts=["purple banana"]))
    assert (right.metrics, wrong.metrics, junk.metrics) == ({"acc": 1.0}, {"acc": 0.0}, {"acc": 0.0})
    assert right.extra == {"response": f"{'ABCD'[gold]}. {COLOURS[gold]}", "pred": gold, "images": 1}
    assert junk.extra["pred"] == -1 and junk.prediction == "purple banana"
    # Few-shot: each shot is a user turn with its own image, then its letter as the assistant's turn.
    shots = bench.build(docs[2], 2, docs[:2], chat=True)
    assert [m["role"] for m in shots.messages] == ["user", "assistant", "user", "assistant", "user"]
    assert shots.messages[1]["content"] == "ABCD"[docs[0]["answer"]] and len(shots.images) == 3


def test_an_image_qa_row_is_scored_by_exact_match(tmp_path):
    bench, docs, _ = _load(tmp_path, "qa")
    assert bench.info.kind == "generation" and bench.info.metrics == ["exact_match"]
    req = bench.build(docs[0], 0, [], chat=False)
    assert req.messages[0]["content"][-1] == {"type": "text", "text": "What colour is the shape? Answer with one word."}
    ref = docs[0]["reference"]
    assert bench.score(docs[0], req, bm.GenResult(texts=[f"  {ref.upper()}\n"])).metrics == {"exact_match": 1.0}
    assert bench.score(docs[0], req, bm.GenResult(texts=["mauve"])).metrics == {"exact_match": 0.0}


def test_a_text_set_keeps_log_likelihood_scoring():
    rows = [(1, {"question": "2 + 2 =", "choices": ["3", "4"], "answer": 1})]
    bench, _ = bm.custom_benchmark(rows, name="custom:quiz", field="dataset_version")
    assert not bench.with_images
    assert isinstance(bench.build(bench._docs[0], 0, [], chat=False), bm.MCRequest)


def test_bad_images_fields_name_the_row():
    rows = [
        (1, {"question": "q?", "choices": ["a", "b"], "answer": 0, "images": "images/x.png"}),
        (2, {"question": "q?", "choices": ["a", "b"], "answer": 0, "images": ["images/x.png", ""]}),
        (3, {"question": "q?", "choices": ["a", "b"], "answer": 0, "images": [{"url": "images/x.png"}]}),
    ]
    with pytest.raises(InvalidArgument) as err:
        bm.custom_benchmark(rows, name="custom:bad", field="dataset_version")
    fields = [v.field for v in err.value.violations]
    assert fields == ["dataset_version[row 1].images", "dataset_version[row 2].images[1]"]
    assert "must be a list" in err.value.message and "data: URL" in err.value.message


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        ("B", 1), ("(C)", 2), ("D. yellow", 3), ("The answer is B.", 1), ("Answer: A", 0), ("blue", 2),
        ("It is Green.", 1), ("B blue", 2), ("E", None), ("", None), ("red or green", None), ("a", None),
    ],
)  # fmt: skip
def test_a_reply_is_parsed_to_a_choice(reply, expected):
    assert parse_choice(reply, COLOURS) == expected


def test_images_are_read_into_chat_parts_and_image_url_parts(tmp_path):
    bench, docs, policy = _load(tmp_path, "multiple_choice")
    req = bench.build(docs[1], 1, [], chat=False)
    png = (policy.base_dir / req.images[0]).read_bytes()
    resolved = _with_image_data(req, policy, docs[1])
    assert req.messages[0]["content"][0] == {"type": "image", "image": req.images[0]}  # the plan is unchanged
    msg = _chat_message(resolved.messages[0])
    assert msg.role == ipb.CHAT_ROLE_USER and msg.content == ""
    assert [p.WhichOneof("kind") for p in msg.parts] == ["image", "text"]
    assert msg.parts[0].image.data == png and msg.parts[0].image.mime_type == "image/png"
    assert msg.parts[1].text.endswith(MC_INSTRUCTION)
    wire = _openai_message(resolved.messages[0])
    assert wire["content"][0] == {
        "type": "image_url", "image_url": {"url": "data:image/png;base64," + base64.b64encode(png).decode()}
    }  # fmt: skip
    json.dumps(wire)  # plain JSON
    # A data: URL in a plain file resolves without an archive.
    rows = [(1, {"prompt": "colour?", "reference": "red", "images": [wire["content"][0]["image_url"]["url"]]})]
    inline, _ = bm.custom_benchmark(rows, name="custom:inline", field="dataset_version")
    inline_req = _with_image_data(inline.build(inline._docs[0], 0, [], chat=False), ImagePolicy(), inline._docs[0])
    assert inline_req.messages[0]["content"][0]["data"] == png


def test_a_row_whose_image_cannot_be_loaded_is_named(tmp_path):
    bench, docs, policy = _load(tmp_path, "multiple_choice", n=4)
    check_images("datasets/colours/versions/v1", docs, policy)  # all fine
    (policy.base_dir / docs[2]["images"][0]).write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (policy.base_dir / docs[3]["images"][0]).unlink()
    with pytest.raises(InvalidArgument) as err:
        check_images("datasets/colours/versions/v1", docs, policy)
    assert err.value.reason == "EVAL_SET_IMAGE_INVALID"
    assert [v.field for v in err.value.violations] == [
        f"dataset_version[row {docs[2]['row']}].images[0]", f"dataset_version[row {docs[3]['row']}].images[0]"
    ]  # fmt: skip
    assert "2 image(s) cannot be loaded" in err.value.message and "not a readable image" in err.value.message
    with pytest.raises(InvalidArgument, match=rf"row {docs[3]['row']}: image .*not in the dataset"):
        _with_image_data(bench.build(docs[3], 3, [], chat=False), policy, docs[3])
