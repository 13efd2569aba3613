"""Image+text datasets without a service: safe archive extraction, image references and their reading, the
image checks of ``validate_dataset`` (real files, real PIL, the tiny Qwen2-VL's real processor)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from cli.demo_vlm import QUESTION, data_url, png_bytes, shape_image
from services.core.datasets import DatasetFormat, ImageCheck, row_errors, to_messages, to_qa, validate_dataset
from services.core.errors import InvalidArgument
from services.core.image_datasets import (
    ImageError,
    ImagePolicy,
    decode_image,
    extract_archive,
    image_refs,
    load_image,
    opened_dataset,
    processor_token_count,
    read_image_bytes,
)
from services.core.vision import load_processor
from tests.support.vlm_model import shape_dataset, tiny_vlm  # noqa: F401 - fixtures

RED = png_bytes(shape_image("red", "square"))


def row(*refs: str) -> dict:
    parts = [{"type": "image_url", "image_url": {"url": r}} for r in refs]
    return {"messages": [{"role": "user", "content": [*parts, {"type": "text", "text": QUESTION}]},
                         {"role": "assistant", "content": "red"}]}


def make_zip(path: Path, members: dict[str, bytes]) -> Path:
    with zipfile.ZipFile(path, "w") as z:
        for name, data in members.items():
            z.writestr(name, data)
    return path


def make_tar(path: Path, members: dict[str, bytes | tuple[bytes, str]]) -> Path:
    with tarfile.open(path, "w:gz" if path.name.endswith("gz") else "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(data, tuple):  # (b"", link kind)
                info.type, info.linkname = (tarfile.SYMTYPE if data[1] == "sym" else tarfile.LNKTYPE), "data.jsonl"
                t.addfile(info)
            else:
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    return path


# ----------------------------------------------------------------------------- archives


def test_extract_archive_finds_the_one_data_file_in_zip_and_tar(tmp_path) -> None:
    z = make_zip(tmp_path / "a.zip", {"set/data.jsonl": b"{}\n", "set/images/a.png": RED, "__MACOSX/._x.jsonl": b"x",
                                      ".hidden/y.json": b"[]"})
    data = extract_archive(z, tmp_path / "z")
    assert data == tmp_path / "z" / "set" / "data.jsonl" and (data.parent / "images" / "a.png").read_bytes() == RED
    t = make_tar(tmp_path / "b.tar.gz", {"data.parquet": b"PAR1", "img/b.png": RED})
    assert extract_archive(t, tmp_path / "t").name == "data.parquet"


@pytest.mark.parametrize(("members", "why"), [
    ({"data.jsonl": b"{}", "../evil.png": RED}, "'../evil.png' has an absolute path or '..'"),
    ({"data.jsonl": b"{}", "/etc/evil.png": RED}, "'/etc/evil.png' has an absolute path or '..'"),
    ({"a.jsonl": b"{}", "b.json": b"[]"}, "exactly one data file"),
    ({"images/a.png": RED}, "found none"),
])
def test_extract_archive_refuses_unsafe_or_ambiguous_zips(tmp_path, members, why) -> None:
    with pytest.raises(ImageError, match=why.replace("(", r"\(").replace(".", r"\.")):
        extract_archive(make_zip(tmp_path / "x.zip", members), tmp_path / "out")
    assert not (tmp_path / "evil.png").exists()


def test_extract_archive_refuses_links_and_caps_members_and_bytes(tmp_path) -> None:
    for kind in ("sym", "hard"):
        tar = make_tar(tmp_path / f"{kind}.tar", {"data.jsonl": b"{}\n", "a.png": (b"", kind)})
        with pytest.raises(ImageError, match="'a.png' is not a regular file"):
            extract_archive(tar, tmp_path / kind)
    z = tmp_path / "link.zip"
    with zipfile.ZipFile(z, "w") as f:
        f.writestr("data.jsonl", b"{}")
        info = zipfile.ZipInfo("a.png")
        info.external_attr = 0o120777 << 16
        f.writestr(info, "/etc/passwd")
    with pytest.raises(ImageError, match="symbolic link"):
        extract_archive(z, tmp_path / "zl")
    many = make_zip(tmp_path / "many.zip", {"data.jsonl": b"{}", **{f"i/{i}.png": RED for i in range(5)}})
    with pytest.raises(ImageError, match="more than 3 files"):
        extract_archive(many, tmp_path / "m", max_members=3)
    with pytest.raises(ImageError, match="extracts to more than 100 bytes"):
        extract_archive(many, tmp_path / "b", max_bytes=100)
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all")
    with pytest.raises(ImageError, match="not a readable archive"):
        extract_archive(tmp_path / "junk.zip", tmp_path / "j")


def test_opened_dataset_extracts_an_archive_and_removes_it_after(tmp_path) -> None:
    z = make_zip(tmp_path / "a.zip", {"data.jsonl": b"{}\n", "images/a.png": RED})
    with opened_dataset(z, tmp_path) as (data, image_dir):
        assert data.read_bytes() == b"{}\n" and image_dir == data.parent and (image_dir / "images/a.png").is_file()
    assert not data.exists()
    plain = tmp_path / "p.jsonl"
    plain.write_text("{}\n")
    with opened_dataset(plain) as (data, image_dir):
        assert (data, image_dir) == (plain, None)


# ----------------------------------------------------------------------------- references and images


def test_image_refs_name_every_image_field() -> None:
    r = {"messages": [{"role": "system", "content": "s"},
                      {"role": "user", "content": [{"type": "text", "text": "q"}, {"type": "image", "image": "a.png"},
                                                   {"type": "image_url", "image_url": {"url": "b.png"}}]}],
         "images": ["c.png", {"url": "d.png"}]}
    assert list(image_refs(r)) == [("messages[1].content[1].image", "a.png"),
                                   ("messages[1].content[2].image_url.url", "b.png"),
                                   ("images[0]", "c.png"), ("images[1]", "d.png")]
    assert list(image_refs([1, 2])) == []


class _Images(BaseHTTPRequestHandler):
    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        self.send_response(200)
        self.end_headers()
        self.wfile.write(RED)

    def log_message(self, *args) -> None:
        pass


def test_read_image_bytes_resolves_paths_data_urls_and_only_allowed_remote_urls(tmp_path) -> None:
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.png").write_bytes(RED)
    policy = ImagePolicy(base_dir=tmp_path)
    assert read_image_bytes("images/a.png", policy) == RED
    assert read_image_bytes(data_url(shape_image("red", "square")), ImagePolicy()) == RED
    assert load_image("images/a.png", policy).size == (56, 56)
    cases = [
        ("images/b.png", policy, "'images/b.png' is not in the dataset"),
        ("../a.png", policy, "must be a path inside the dataset"),
        ("/etc/passwd", policy, "must be a path inside the dataset"),
        ("images/a.png", ImagePolicy(), "not an archive holding its images"),
        ("data:image/png,abc", policy, "must be base64"),
        ("data:image/png;base64,@@@", policy, "not valid base64"),
        ("ftp://x/a.png", policy, "unsupported image reference scheme"),
        ("https://example.com/a.png", policy, "remote image URLs are not fetched"),
        ("", policy, "must be an image path"),
        ("images/a.png", ImagePolicy(base_dir=tmp_path, max_bytes=10), "more than 10"),
    ]
    for ref, pol, why in cases:
        with pytest.raises(ImageError, match=why.replace(".", r"\.").replace("/", ".")):
            read_image_bytes(ref, pol)

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/a.png"
        assert read_image_bytes(url, ImagePolicy(allow_remote=True)) == RED
    finally:
        server.shutdown()
        server.server_close()


def test_decode_image_refuses_what_is_not_a_readable_image() -> None:
    assert decode_image(RED).mode == "RGB"
    with pytest.raises(ImageError, match="is not an image"):
        decode_image(b"hello")
    with pytest.raises(ImageError, match="not a readable image"):
        decode_image(RED[:60])


# ----------------------------------------------------------------------------- rows and validation


def test_row_checks_accept_image_parts_and_enforce_role_order() -> None:
    assert row_errors(row("a.png"), DatasetFormat.MESSAGES) == []
    assert row_errors({"question": "q", "choices": ["a", "b"], "answer": 0, "images": ["a.png", 3]},
                      DatasetFormat.MULTIPLE_CHOICE) == [("images[1]", "must be a string (an image path inside the "
                                                          "dataset archive, a data: URL or an http(s) URL), got int")]
    msgs = lambda *roles: {"messages": [{"role": r, "content": "x"} for r in roles]}  # noqa: E731
    assert row_errors(msgs("system", "user", "user", "assistant"), DatasetFormat.MESSAGES) == []
    assert row_errors(msgs("user", "system", "assistant"), DatasetFormat.MESSAGES) == [
        ("messages[1].role", "a system message must be the first message")]
    assert row_errors(msgs("user", "assistant", "assistant"), DatasetFormat.MESSAGES) == [
        ("messages[2].role", "an assistant message must answer a user or tool message, not 'assistant'")]
    assert row_errors(msgs("user", "tool", "assistant"), DatasetFormat.MESSAGES) == [
        ("messages[1].role", "a tool message must follow an assistant message, not 'user'")]
    assert row_errors(msgs("system", "assistant"), DatasetFormat.MESSAGES)[0][0] == "messages[1].role"
    # The answer lists of a preference row continue the prompt: no start rule there.
    pref = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}]}
    assert row_errors(pref, DatasetFormat.PREFERENCE) == []
    assert row_errors({**row("a.png"), "images": ["a.png"]}, DatasetFormat.MESSAGES)[0][0] == "images"


def test_normalised_rows_keep_their_images() -> None:
    messages = to_messages(row("a.png"), DatasetFormat.MESSAGES)
    assert messages[0]["content"][0] == {"type": "image_url", "image_url": {"url": "a.png"}}
    assert messages[1] == {"role": "assistant", "content": "red"}
    qa = {"prompt": "p", "reference": "r", "images": ["a.png"]}
    assert to_qa(qa)["images"] == ["a.png"]
    assert to_messages(qa, DatasetFormat.QA)[0]["content"] == [
        {"type": "image_url", "image_url": {"url": "a.png"}}, {"type": "text", "text": "p"}]


def test_validate_dataset_takes_an_archive_and_checks_every_image(tmp_path) -> None:
    rows = [row("images/a.png"), row("images/missing.png"), row("images/a.png", "images/a.png", "images/a.png")]
    z = make_zip(tmp_path / "set.zip", {"data.jsonl": "".join(json.dumps(r) + "\n" for r in rows).encode(),
                                        "images/a.png": RED})
    report = validate_dataset(z, workdir=tmp_path)
    assert (report.format, report.row_count, report.valid_rows, report.image_count, report.max_images_per_row) == (
        DatasetFormat.MESSAGES, 3, 2, 5, 3)
    assert [(e.row, e.field) for e in report.errors] == [(2, "messages[0].content[0].image_url.url")]
    assert report.sha256 == hashlib.sha256(z.read_bytes()).hexdigest() and report.size_bytes == z.stat().st_size
    assert [p.name for p in tmp_path.iterdir()] == ["set.zip"]  # the extraction is gone

    limited = validate_dataset(z, images=ImageCheck(max_images_per_row=2, model="m"))
    assert [(e.row, e.field, e.reason) for e in limited.errors][1] == (
        3, "messages[0].content[2].image_url.url", "3 images in this row, more than the 2 model m takes per row")
    text_only = validate_dataset(z, images=ImageCheck(model="m", takes_images=False))
    assert text_only.valid_rows == 0 and {e.reason for e in text_only.errors} == {"model m takes no images (a text-only model)"}

    make_zip(tmp_path / "bad.zip", {"data.jsonl": b"{}", "../x": b""})
    with pytest.raises(InvalidArgument) as info:
        validate_dataset(tmp_path / "bad.zip")
    assert info.value.reason == "DATASET_ARCHIVE_INVALID" and "bad.zip" in info.value.message


def test_processor_counts_image_tokens_after_the_resize(tiny_vlm, shape_dataset) -> None:
    processor = load_processor(tiny_vlm)
    messages = to_messages(row("x"), DatasetFormat.MESSAGES)
    text_only, none = processor_token_count(processor, to_messages(
        {"messages": [{"role": "user", "content": QUESTION}, {"role": "assistant", "content": "red"}]},
        DatasetFormat.MESSAGES), [])
    assert none == 0
    # 56x56 -> a 4x4 grid of 14 px patches, merged 2x2: 4 tokens; 112x112 (max_pixels): 8x8 -> 16; 300x300 is
    # resized down under max_pixels, to a multiple of 28 px (84x84): 6x6 -> 9.
    for size, expected in ((56, 4), (112, 16), (300, 9)):
        n, image_tokens = processor_token_count(processor, messages, [shape_image("red", "circle", size=size)])
        assert image_tokens == expected and n == text_only + expected + 2  # + vision start / end
    report = validate_dataset(shape_dataset, images=ImageCheck(processor=processor), max_length=20)
    assert report.ok and report.token_stats.image_tokens == 48 * 4 and report.token_stats.images == 48
