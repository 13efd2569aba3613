"""Opaque page tokens for List RPCs: an offset bound to the query it was issued for.

A token reused with another filter or order (a different ``fingerprint``) is refused, as is
anything that is not a token this code issued.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from .errors import InvalidArgument


def encode_page_token(offset: int, fingerprint: Any = None) -> str:
    raw = json.dumps({"o": offset, "f": fingerprint}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, fingerprint: Any = None) -> int:
    """The offset a token stands for (0 for the first page)."""
    if not token:
        return 0
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        offset = int(data["o"])
    except (binascii.Error, ValueError, KeyError, TypeError):
        raise InvalidArgument.for_field("page_token", "is not a token returned by this list") from None
    if data.get("f") != fingerprint or offset < 0:
        raise InvalidArgument.for_field("page_token", "was issued for a different filter or order")
    return offset
