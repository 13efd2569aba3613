"""Image+text datasets: the archive they are uploaded as, and the images their rows refer to.

A dataset with images is uploaded as one archive (``.zip``, ``.tar``, ``.tar.gz``/``.tgz``) holding exactly
one data file (``.jsonl``, ``.json``, ``.parquet``, optionally ``.gz``) and the image files its rows refer to
by a path relative to the data file's folder. A plain data file may also carry its images inline as
``data:image/...;base64,`` URLs. Rows refer to images as OpenAI content parts in messages
(``{"type": "image_url", "image_url": {"url": REF}}``, or ``{"type": "image", "image": REF}``) or, in the
evaluation formats, as an ``images`` list of REFs.

The archive is stored as uploaded (its SHA-256 is the dataset version's); readers (validation, training,
evaluation) extract it with :func:`extract_archive`, which refuses absolute paths, ``..``, links and
devices, and caps the number of members and the extracted size (an archive bomb stops at the cap).

Remote images (``http(s)://``) are never fetched by default: a row naming one is invalid unless the caller
allows remote images (:class:`ImagePolicy`).
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import shutil
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
DATA_SUFFIXES = (".jsonl", ".json", ".parquet", ".jsonl.gz", ".json.gz")
IMAGE_PART_TYPES = ("image_url", "image")
MAX_MEMBERS = 100_000
MAX_EXTRACTED_BYTES = 20 << 30
MAX_IMAGE_BYTES = 20 << 20
MAX_IMAGE_PIXELS = 64_000_000
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "image/png"),
    (b"\xff\xd8\xff", "image/jpeg"),
    (b"GIF87a", "image/gif"),
    (b"GIF89a", "image/gif"),
    (b"BM", "image/bmp"),
)


class ImageError(ValueError):
    """A row's image is missing, unreadable, too large or not allowed: ``str(e)`` says which."""


@dataclass(frozen=True)
class ImagePolicy:
    """How image references are resolved: relative paths inside ``base_dir`` (the extracted archive's data
    folder; None for a plain file, where relative paths cannot resolve), data URLs always, remote URLs only
    when ``allow_remote``."""

    base_dir: Path | None = None
    allow_remote: bool = False
    max_bytes: int = MAX_IMAGE_BYTES
    remote_timeout_s: float = 10.0


@dataclass(frozen=True)
class ImageCheck:
    """What :func:`services.core.datasets.validate_dataset` checks of the images rows refer to.

    Every reference is read and decoded (a missing file, bytes that are not an image, a remote URL when
    ``allow_remote`` is off: each a row error naming the field). ``model`` names the model the rows are
    checked for in errors: with ``takes_images`` False (a text-only model) any image is an error; a row with
    more than ``max_images_per_row`` images (0: no limit) is an error. ``processor`` (a vision-language
    model's, :func:`services.core.vision.load_processor`) counts each row's tokens with its images expanded
    to the image tokens the model sees."""

    allow_remote: bool = False
    max_images_per_row: int = 0
    model: str = ""
    takes_images: bool = True
    processor: Any = None

    def policy(self, base_dir: Path | None) -> ImagePolicy:
        return ImagePolicy(base_dir=base_dir, allow_remote=self.allow_remote)


def is_archive(filename: str) -> bool:
    return filename.lower().endswith(ARCHIVE_SUFFIXES)


def sniff_mime(data: bytes) -> str | None:
    """The image media type by magic bytes (PNG, JPEG, GIF, BMP, WebP), or None."""
    for magic, mime in _MAGIC:
        if data.startswith(magic):
            return mime
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


def _safe_member(name: str) -> PurePosixPath:
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise ImageError(f"archive member {name!r} has an absolute path or '..'")
    return path


def extract_archive(
    archive: Path, dest: Path, *, max_members: int = MAX_MEMBERS, max_bytes: int = MAX_EXTRACTED_BYTES
) -> Path:
    """Extract ``archive`` into ``dest`` and return its one data file. Raises :class:`ImageError` for an
    unsafe member (absolute, ``..``, link, device), too many members or bytes, or not exactly one data file."""
    dest.mkdir(parents=True, exist_ok=True)
    members = 0
    total = 0

    def budget(name: str, size: int) -> None:
        nonlocal members, total
        members += 1
        total += size
        if members > max_members:
            raise ImageError(f"archive holds more than {max_members} files")
        if total > max_bytes:
            raise ImageError(f"archive extracts to more than {max_bytes} bytes (at {name!r})")

    name = archive.name.lower()
    try:
        if name.endswith(".zip"):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    rel = _safe_member(info.filename)
                    if info.is_dir():
                        continue
                    if (info.external_attr >> 16) & 0o170000 == 0o120000:
                        raise ImageError(f"archive member {info.filename!r} is a symbolic link")
                    budget(info.filename, info.file_size)
                    target = dest.joinpath(*rel.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    with z.open(info) as src, open(target, "wb") as out:
                        _copy_capped(src, out, info.file_size, info.filename)
        else:
            with tarfile.open(archive, "r:*") as t:
                for member in t:
                    rel = _safe_member(member.name)
                    if member.isdir():
                        continue
                    if not member.isfile():
                        raise ImageError(f"archive member {member.name!r} is not a regular file")
                    budget(member.name, member.size)
                    target = dest.joinpath(*rel.parts)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    data_in = t.extractfile(member)
                    assert data_in is not None  # a regular file
                    with data_in, open(target, "wb") as out:
                        _copy_capped(data_in, out, member.size, member.name)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, OSError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"not a readable archive: {exc}") from None
    data = sorted(
        p
        for p in dest.rglob("*")
        if p.is_file()
        and p.name.lower().endswith(DATA_SUFFIXES)
        and not any(part.startswith((".", "__MACOSX")) for part in p.relative_to(dest).parts)
    )
    if len(data) != 1:
        found = ", ".join(str(p.relative_to(dest)) for p in data[:5]) or "none"
        raise ImageError(f"archive must hold exactly one data file ({', '.join(DATA_SUFFIXES)}); found {found}")
    return data[0]


def _copy_capped(src: Any, out: Any, declared: int, name: str) -> None:
    written = 0
    while chunk := src.read(1 << 20):
        written += len(chunk)
        if written > declared:  # the header lied: never write more than was budgeted
            raise ImageError(f"archive member {name!r} is larger than its header says")
        out.write(chunk)


def image_refs(row: Any) -> Iterator[tuple[str, Any]]:
    """``(field, ref)`` for every image a row refers to, ``field`` naming it as errors do
    (``messages[0].content[1].image_url.url``, ``images[0]``)."""
    if not isinstance(row, dict):
        return
    for key in ("messages", "chosen", "rejected", "prompt", "completion", "conversations"):
        value = row.get(key)
        if not isinstance(value, list):
            continue
        for i, msg in enumerate(value):
            content = msg.get("content") if isinstance(msg, dict) else None
            if not isinstance(content, list):
                continue
            for j, part in enumerate(content):
                if not isinstance(part, dict) or part.get("type") not in IMAGE_PART_TYPES:
                    continue
                fld = f"{key}[{i}].content[{j}]"
                if part.get("type") == "image_url":
                    inner = part.get("image_url")
                    ref = inner.get("url") if isinstance(inner, dict) else inner
                    yield f"{fld}.image_url.url", ref
                else:
                    yield f"{fld}.image", part.get("image")
    images = row.get("images")
    if isinstance(images, list):
        for i, ref in enumerate(images):
            yield f"images[{i}]", ref.get("url") if isinstance(ref, dict) else ref


def read_image_bytes(ref: Any, policy: ImagePolicy) -> bytes:
    """The encoded bytes of one image reference; :class:`ImageError` says why it cannot be had."""
    if not isinstance(ref, str) or not ref.strip():
        raise ImageError("must be an image path inside the dataset, a data: URL or an http(s) URL")
    ref = ref.strip()
    if ref.startswith("data:"):
        header, sep, payload = ref.partition(",")
        if not sep or ";base64" not in header:
            raise ImageError("a data URL must be base64: data:image/png;base64,...")
        if len(payload) > policy.max_bytes * 4 // 3 + 4:
            raise ImageError(f"image is larger than {policy.max_bytes} bytes")
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise ImageError("data URL is not valid base64") from None
    if ref.startswith(("http://", "https://")):
        if not policy.allow_remote:
            raise ImageError(
                "remote image URLs are not fetched; put the image in the dataset archive or inline it as a data: URL"
            )
        return _fetch(ref, policy)
    if "://" in ref:
        raise ImageError(f"unsupported image reference scheme in {ref[:40]!r}")
    if policy.base_dir is None:
        raise ImageError(f"{ref!r} is a path, but the dataset is not an archive holding its images")
    rel = PurePosixPath(ref)
    if rel.is_absolute() or ".." in rel.parts:
        raise ImageError(f"{ref!r} must be a path inside the dataset (no absolute path, no '..')")
    path = policy.base_dir.joinpath(*rel.parts)
    if not path.is_file():
        raise ImageError(f"{ref!r} is not in the dataset")
    size = path.stat().st_size
    if size > policy.max_bytes:
        raise ImageError(f"{ref!r} is {size} bytes, more than {policy.max_bytes}")
    return path.read_bytes()


def _fetch(url: str, policy: ImagePolicy) -> bytes:
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=policy.remote_timeout_s) as resp:  # noqa: S310 - http(s) only
            data = resp.read(policy.max_bytes + 1)
    except OSError as exc:
        raise ImageError(f"could not fetch {url[:80]!r}: {exc}") from None
    if len(data) > policy.max_bytes:
        raise ImageError(f"image at {url[:80]!r} is larger than {policy.max_bytes} bytes")
    return data


def decode_image(data: bytes):
    """A loaded RGB PIL image; :class:`ImageError` when the bytes are not a readable image."""
    from PIL import Image, UnidentifiedImageError

    if sniff_mime(data) is None:
        raise ImageError("is not an image (PNG, JPEG, GIF, BMP or WebP)")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ImageError(f"image is {img.width}x{img.height} px, more than {MAX_IMAGE_PIXELS} pixels")
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        if isinstance(exc, ImageError):
            raise
        raise ImageError(f"is not a readable image: {exc}") from None


def load_image(ref: Any, policy: ImagePolicy):
    """``read_image_bytes`` then ``decode_image``."""
    return decode_image(read_image_bytes(ref, policy))


def data_dir_for(data_file: Path) -> Path:
    """The folder image paths are relative to: the data file's own."""
    return Path(os.path.dirname(data_file))


@contextmanager
def opened_dataset(path: Path, workdir: Path | None = None) -> Iterator[tuple[Path, Path | None]]:
    """``(data_file, image_dir)`` of a dataset: an archive is extracted into a temporary folder under
    ``workdir`` (removed on exit) and ``image_dir`` is its data file's folder; a plain file is itself, with
    no image folder (its rows can only carry data: URLs). Raises :class:`ImageError` for an unsafe or
    unreadable archive."""
    path = Path(path)
    if not is_archive(path.name):
        yield path, None
        return
    tmp = Path(tempfile.mkdtemp(prefix="dataset-archive-", dir=workdir))
    try:
        data = extract_archive(path, tmp / "x")
        yield data, data_dir_for(data)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def image_ref_of_part(part: Any) -> Any:
    """The REF of one image content part (``image_url.url``, ``image_url`` as a string, or ``image``)."""
    if part.get("type") == "image_url":
        inner = part.get("image_url")
        return inner.get("url") if isinstance(inner, dict) else inner
    return part.get("image")


def conversation_image_refs(messages: list[dict]) -> list[Any]:
    """The image REFs of a list of chat messages, in order (what a chat template renders placeholders for)."""
    refs = []
    for msg in messages:
        content = msg.get("content") if isinstance(msg, dict) else None
        if isinstance(content, list):
            refs += [image_ref_of_part(p) for p in content if isinstance(p, dict) and p.get("type") in IMAGE_PART_TYPES]
    return refs


def processor_token_count(processor: Any, messages: list[dict], images: list[Any]) -> tuple[int, int]:
    """``(tokens, image_tokens)`` of one conversation as a vision-language model's processor encodes it: the
    chat template rendered, then the processor expanding each image placeholder to the image's tokens (for
    Qwen2-VL ``t*h*w / merge_size**2`` of the ``image_grid_thw`` its image processor computes after resizing)."""
    text = processor.apply_chat_template(messages, tokenize=False)
    out = processor(text=[text], images=images or None)
    ids = out["input_ids"][0]
    n = len(ids)
    if not images:
        return n, 0
    grid = out.get("image_grid_thw")
    if grid is not None:
        merge = int(getattr(processor.image_processor, "merge_size", 1) or 1)
        return n, int(sum(int(t) * int(h) * int(w) for t, h, w in grid) // (merge * merge))
    token_id = getattr(processor, "image_token_id", None)
    return n, (sum(1 for i in ids if i == token_id) if token_id is not None else 0)
