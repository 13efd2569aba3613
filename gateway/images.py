"""Image parts of chat messages (``{"type": "image_url", "image_url": {"url": ...}}``) -> encoded image bytes.

The gateway is the only place an image URL is read: a ``data:`` URL is decoded here, and an http(s) URL is
fetched here (only when ``images.allow_remote_urls`` is on: with a timeout, a byte cap, no other scheme,
redirects followed only to http(s) again), so the inference service and its engines get bytes and never open
a connection on a user's behalf. Every image is checked by its first bytes (PNG, JPEG, WebP, GIF, BMP): a
declared media type the bytes do not match, or bytes that are no image, are a 400 naming the field
(``messages[0].content[1].image_url.url``).
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass

import httpx

from services.core.errors import InvalidArgument

from .settings import ImageSettings

MIME_TYPES = ("image/png", "image/jpeg", "image/webp", "image/gif", "image/bmp")
_ALIASES = {"image/jpg": "image/jpeg", "image/x-ms-bmp": "image/bmp", "image/x-bmp": "image/bmp"}


@dataclass(frozen=True)
class Image:
    """One image as the engines get it."""

    data: bytes
    mime_type: str


def sniff(data: bytes) -> str | None:
    """The media type ``data`` starts like (one of ``MIME_TYPES``), or None when it is no such image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "image/gif"
    if data.startswith(b"BM") and len(data) >= 26:
        return "image/bmp"
    return None


def check_image(data: bytes, declared: str | None, field: str, max_bytes: int) -> Image:
    """``data`` as an ``Image``: non-empty, at most ``max_bytes``, a known image format matching ``declared``
    (a media type the sender gave, None when it gave none); a 400 naming ``field`` otherwise."""
    if not data:
        raise InvalidArgument.for_field(field, "the image is empty")
    if len(data) > max_bytes:
        raise InvalidArgument.for_field(
            field, f"the image has {len(data)} bytes; at most {max_bytes} are allowed (images.max_bytes)"
        )
    sniffed = sniff(data)
    if sniffed is None:
        raise InvalidArgument.for_field(
            field, f"the data is not an image of a supported format ({', '.join(MIME_TYPES)})"
        )
    if declared is not None and declared != sniffed:
        raise InvalidArgument.for_field(field, f"the data URL says {declared} but the bytes are {sniffed}")
    return Image(data, sniffed)


def parse_data_url(url: str, field: str, max_bytes: int) -> Image:
    """A ``data:image/<type>;base64,<data>`` URL decoded and checked (``check_image``).

    The base64 text is measured before it is decoded, so an oversize image is refused without decoding it."""
    header, comma, payload = url.partition(",")
    if not comma or not header.lower().startswith("data:"):
        raise InvalidArgument.for_field(field, "a data URL must look like data:image/png;base64,<data>")
    params = [p.strip().lower() for p in header[5:].split(";")]
    mime = _ALIASES.get(params[0], params[0])
    if "base64" not in params[1:]:
        raise InvalidArgument.for_field(field, "only base64 data URLs are accepted (data:image/png;base64,...)")
    if mime not in MIME_TYPES:
        raise InvalidArgument.for_field(
            field, f"media type {params[0] or '(none)'!r} is not an accepted image type ({', '.join(MIME_TYPES)})"
        )
    payload = payload.strip()
    if len(payload) > 4 * ((max_bytes + 2) // 3) + 4:
        raise InvalidArgument.for_field(
            field, f"the image has more than {max_bytes} bytes (images.max_bytes), judging by its base64 length"
        )
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise InvalidArgument.for_field(field, f"invalid base64 data: {exc}") from None
    return check_image(data, mime, field, max_bytes)


async def fetch_image(url: str, field: str, settings: ImageSettings, client: httpx.AsyncClient) -> Image:
    """An http(s) image fetched with ``images.fetch_timeout_s`` and at most ``images.max_bytes`` read; any failure
    is a 400 naming ``field`` (the URL is the user's: what it answers is not the gateway's error)."""
    cap = settings.max_bytes
    try:
        async with client.stream("GET", url, timeout=settings.fetch_timeout_s) as resp:
            if resp.status_code != 200:
                raise InvalidArgument.for_field(field, f"fetching the image answered HTTP {resp.status_code}")
            if resp.url.scheme not in ("http", "https"):
                raise InvalidArgument.for_field(field, "the image URL led to a non-http(s) URL")
            declared = resp.headers.get("content-length")
            if declared and declared.isdigit() and int(declared) > cap:
                raise InvalidArgument.for_field(
                    field, f"the image has {declared} bytes; at most {cap} are allowed (images.max_bytes)"
                )
            body = bytearray()
            async for piece in resp.aiter_bytes():
                body += piece
                if len(body) > cap:
                    raise InvalidArgument.for_field(field, f"the image has more than {cap} bytes (images.max_bytes)")
    except httpx.HTTPError as exc:
        raise InvalidArgument.for_field(field, f"could not fetch the image: {type(exc).__name__}: {exc}") from None
    return check_image(bytes(body), None, field, cap)


async def load_image(url: str, field: str, settings: ImageSettings, client: httpx.AsyncClient | None) -> Image:
    """The image an ``image_url.url`` names: a data URL, or (when allowed) an http(s) URL; a 400 naming ``field``
    for anything else."""
    scheme = url[:8].lower()
    if scheme.startswith("data:"):
        return parse_data_url(url, field, settings.max_bytes)
    if scheme.startswith(("http://", "https://")):
        if not settings.allow_remote_urls or client is None:
            raise InvalidArgument.for_field(
                field,
                "image URLs are not fetched by this gateway: send the image inline as a data URL "
                "(data:image/png;base64,...); an administrator may allow http(s) URLs (images.allow_remote_urls)",
            )
        return await fetch_image(url, field, settings, client)
    raise InvalidArgument.for_field(field, "must be a data:image/...;base64 URL (or an http(s) URL where allowed)")
