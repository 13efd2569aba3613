"""The registry's multimodal side through real gRPC on loopback (in-process server, nanio S3, SQLite): a tiny
random Qwen2-VL imported with its vision metadata, image+text dataset archives uploaded, validated row by row
(missing, corrupt and remote images, role order), seen by a vision-language model (image tokens as its
processor counts them) and by a text-only one (images refused), and unsafe archives refused."""

from __future__ import annotations

import asyncio
import io
import json
import math
import shutil
import tarfile
import zipfile
from pathlib import Path

import grpc
from safetensors import safe_open
from typer.testing import CliRunner

from cli.demo_vlm import QUESTION, data_url, png_bytes, shape_image
from cli.registry_cmds import datasets_app, models_app
from modelyard.client import InvalidArgument, NotFound
from modelyard.common.v1 import common_pb2 as cpb
from tests.integration.test_registry import (  # noqa: F401 - fixtures
    create_base,
    expect,
    import_model,
    registry,
    safetensors_param_count,
    store,
    tiny_model,
)
from tests.support.vlm_model import shape_dataset, tiny_vlm  # noqa: F401 - fixtures


def image_part(ref: str) -> dict:
    return {"type": "image_url", "image_url": {"url": ref}}


def question(*refs: str, answer: str = "red") -> dict:
    return {"messages": [{"role": "user", "content": [*(image_part(r) for r in refs), {"type": "text", "text": QUESTION}]},
                         {"role": "assistant", "content": answer}]}


def write_tar(path: Path, members: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w:gz") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


async def cli(app, *args: str, addr: str):
    """A ``yard`` command against the in-process registry (in a thread: the command runs its own event loop)."""
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env={"YARD_REGISTRY_ADDR": addr})


# ----------------------------------------------------------------------------- models


async def test_imported_vlm_has_vision_metadata_and_one_without_its_processor_is_refused(registry, tiny_vlm, tmp_path):
    done = await import_model(registry, "models/vlm", str(tiny_vlm), version_id="v1")
    assert done.state == cpb.JOB_STATE_SUCCEEDED, done.error
    v = await registry.get_model_version("models/vlm/versions/v1")
    m = v.metadata
    assert (m.architecture, m.model_type, m.task) == ("Qwen2VLForConditionalGeneration", "qwen2_vl", "text-generation")
    assert m.HasField("vision")
    x = m.vision
    assert (x.vision_model_type, x.depth, x.hidden_size, x.patch_size, x.spatial_merge_size, x.image_token) == (
        "qwen2_vl_vision", 2, 32, 14, 2, "<|image_pad|>")
    assert {"preprocessor_config.json", "chat_template.jinja"} <= set(x.processor_files)
    # Every tensor counts: the vision tower (and its merger) too.
    with safe_open(str(tiny_vlm / "model.safetensors"), "np") as f:
        vision = sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys() if "visual." in k)  # noqa: SIM118
    assert vision > 0
    assert m.parameter_count == safetensors_param_count(tiny_vlm) > vision

    shown = await cli(models_app, "show", "vlm/v1", addr=registry.target)
    assert shown.exit_code == 0, shown.output
    assert "qwen2_vl_vision: 2 blocks, width 32, patch 14px, merge 2x2" in shown.output
    assert "<|image_pad|>" in shown.output and "preprocessor_config.json" in shown.output

    bare = tmp_path / "no-processor"
    shutil.copytree(tiny_vlm, bare)
    (bare / "preprocessor_config.json").unlink()
    failed = await import_model(registry, "models/vlm-bare", str(bare))
    assert failed.state == cpb.JOB_STATE_FAILED
    assert failed.error.code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert "preprocessor_config.json" in failed.error.message and "vision-language" in failed.error.message


# ----------------------------------------------------------------------------- datasets


async def test_shape_archive_is_counted_and_seen_by_a_vlm_and_by_a_text_only_model(registry, store, shape_dataset,
                                                                                   tiny_vlm, tiny_model):
    v = await registry.upload_dataset(shape_dataset, parent="datasets/shapes")
    assert (v.filename, v.format, v.row_count, v.invalid_row_count, v.image_count) == (
        "train.zip", "messages", 48, 0, 48)
    assert (await registry.get_dataset_version(v.name)).image_count == 48

    plain = await registry.validate_dataset(v.name)
    assert plain.valid_row_count == 48 and not plain.errors
    assert (plain.token_stats.images, plain.token_stats.max_images_per_row) == (48, 1)

    vlm = await create_base(registry, store, tiny_vlm, parent="models/vlm", version_id="base")
    seen = await registry.validate_dataset(v.name, model_version=vlm.name, max_length=12)
    t = seen.token_stats
    assert seen.valid_row_count == 48 and not seen.errors
    # 56x56 px images: a 4x4 patch grid of 14 px, merged 2x2 -> 4 image tokens each.
    assert (t.rows, t.images, t.image_tokens) == (48, 48, 48 * 4)
    assert t.min_tokens > 4 and t.rows_over_max_length == 48  # the image tokens are in each row's length

    text = await create_base(registry, store, tiny_model, parent="models/text", version_id="base")
    refused = await registry.validate_dataset(v.name, model_version=text.name)
    assert refused.valid_row_count == 0 and len(refused.errors) == 48
    assert {(e.field, e.reason) for e in refused.errors} == {
        ("messages[0].content[0].image_url.url", "model models/text/versions/base takes no images (a text-only model)")}

    shown = await cli(datasets_app, "show", "shapes/v1", "--model", "vlm/base", addr=registry.target)
    assert shown.exit_code == 0, shown.output
    assert "192 image tokens" in shown.output and "images: 48" in shown.output


async def test_planted_bad_rows_are_each_reported_with_row_and_field(registry, store, tiny_vlm, tmp_path):
    good = png_bytes(shape_image("red", "square"))
    rows = [
        question("images/good.png"),                                    # 1 ok
        question("images/missing.png"),                                  # 2 missing file
        question("images/corrupt.png"),                                  # 3 corrupt PNG
        question("https://example.com/cat.png"),                         # 4 remote URL
        {"messages": [{"role": "assistant", "content": "red"},            # 5 role order
                      {"role": "user", "content": [image_part("images/good.png")]},
                      {"role": "assistant", "content": "red"}]},
        question(data_url(shape_image("blue", "circle")), answer="blue"),  # 6 ok (inline image)
        question("images/notes.png"),                                    # 7 not an image
        {"messages": [{"role": "user", "content": "colour?"},             # 8 image in the answer
                      {"role": "assistant", "content": [image_part("images/good.png")]}]},
        question(*["images/good.png"] * 9),                              # 9 ok, but 9 images
    ]
    archive = write_tar(tmp_path / "bad.tar.gz", {
        "set/data.jsonl": jsonl(rows), "set/images/good.png": good,
        "set/images/corrupt.png": good[:40] + b"\0" * 30, "set/images/notes.png": b"just some text, not pixels"})
    v = await registry.upload_dataset(archive, parent="datasets/bad")
    assert (v.format, v.row_count, v.invalid_row_count, v.image_count) == ("messages", 9, 6, 17)

    report = await registry.validate_dataset(v.name)
    found = {e.row: (e.field, e.reason) for e in report.errors}
    assert sorted(found) == [2, 3, 4, 5, 7, 8]
    assert found[2] == ("messages[0].content[0].image_url.url", "'images/missing.png' is not in the dataset")
    assert found[3][0] == "messages[0].content[0].image_url.url" and "not a readable image" in found[3][1]
    assert found[4][0] == "messages[0].content[0].image_url.url" and "remote image URLs are not fetched" in found[4][1]
    assert found[5] == ("messages[0].role", "the conversation must start with a user message (after an optional "
                                            "system message), got 'assistant'")
    assert found[7] == ("messages[0].content[0].image_url.url", "is not an image (PNG, JPEG, GIF, BMP or WebP)")
    assert found[8][0] == "messages[1].content[0]" and "assistant message cannot hold images" in found[8][1]

    vlm = await create_base(registry, store, tiny_vlm, parent="models/vlm", version_id="base")
    seen = await registry.validate_dataset(v.name, model_version=vlm.name)
    by_row = {e.row: (e.field, e.reason) for e in seen.errors}
    assert sorted(by_row) == [2, 3, 4, 5, 7, 8, 9]
    assert by_row[9] == ("messages[0].content[8].image_url.url",
                         "9 images in this row, more than the 8 model models/vlm/versions/base takes per row")
    assert seen.token_stats.rows == 2 and seen.token_stats.image_tokens == 8

    # An evaluation set is refused whole, naming the bad row and field.
    qa = [{"prompt": QUESTION, "reference": "red", "images": ["images/good.png"]},
          {"prompt": QUESTION, "reference": "red", "images": ["images/gone.png"]}]
    eval_zip = tmp_path / "eval.zip"
    with zipfile.ZipFile(eval_zip, "w") as z:
        z.writestr("qa.jsonl", jsonl(qa))
        z.writestr("images/good.png", good)
    err = await expect(registry.upload_dataset(eval_zip, parent="datasets/eval"), InvalidArgument,
                       "DATASET_INVALID_ROWS")
    assert "row 2 images[0]: 'images/gone.png' is not in the dataset" in err.message

    # A plain file may carry inline images only.
    plain = tmp_path / "inline.jsonl"
    plain.write_bytes(jsonl([question(data_url(shape_image("green", "circle")), answer="green"),
                             question("images/good.png")]))
    inline = await registry.upload_dataset(plain, parent="datasets/inline")
    assert (inline.row_count, inline.invalid_row_count, inline.image_count) == (2, 1, 2)
    (bad,) = (await registry.validate_dataset(inline.name)).errors
    assert (bad.row, bad.field) == (2, "messages[0].content[0].image_url.url")
    assert "not an archive holding its images" in bad.reason


def _zip_with_symlink(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("data.jsonl", jsonl([question("images/a.png")]))
        link = zipfile.ZipInfo("images/a.png")
        link.external_attr = (0o120777 << 16)
        z.writestr(link, "/etc/passwd")
    return path


async def test_unsafe_archives_are_refused_and_nothing_is_stored(registry, tmp_path):
    traversal = tmp_path / "up.zip"
    with zipfile.ZipFile(traversal, "w") as z:
        z.writestr("data.jsonl", jsonl([question("images/a.png")]))
        z.writestr("../x.png", png_bytes(shape_image("red", "square")))
    tar_link = tmp_path / "link.tar"
    with tarfile.open(tar_link, "w") as t:
        data = jsonl([question("a.png")])
        info = tarfile.TarInfo("data.jsonl")
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("a.png")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        t.addfile(link)
    two = tmp_path / "two.zip"
    with zipfile.ZipFile(two, "w") as z:
        z.writestr("a.jsonl", jsonl([question("x.png")]))
        z.writestr("b.jsonl", jsonl([question("x.png")]))
    cases = [(traversal, "'../x.png' has an absolute path or '..'"),
             (_zip_with_symlink(tmp_path / "link.zip"), "is a symbolic link"),
             (tar_link, "'a.png' is not a regular file"), (two, "exactly one data file")]
    for path, why in cases:
        err = await expect(registry.upload_dataset(path, parent="datasets/unsafe"), InvalidArgument,
                           "DATASET_ARCHIVE_INVALID")
        assert path.name in err.message and why in err.message, err.message
        assert err.violations[0].field == "chunk"
    await expect(registry.list_dataset_versions(parent="datasets/unsafe"), NotFound, "DATASET_NOT_FOUND")
