"""Signed console sessions: the cookie a browser holds after signing in.

A session is a small JSON payload (who signed in, when it expires) and an HMAC-SHA256 of it,
``<base64url(payload)>.<base64url(mac)>``. Nothing is stored on the server: any gateway process
holding the same secret can check it. The secret is ``console.session_secret``, or a random one made
at start (sessions then end with the process).
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import asdict, dataclass, replace
from typing import Literal

COOKIE_NAME = "yard_console"
COOKIE_PATH = "/console"
_VERSION = 1

Kind = Literal["admin", "key"]


@dataclass(frozen=True)
class Session:
    """Who a console session belongs to.

    ``subject`` is ``admin`` or the API key's id; ``playground_key`` the id of the key the console
    minted for an admin session's chat playground (empty until the playground asks for one).
    """

    sid: str
    kind: Kind
    subject: str
    name: str
    key_prefix: str
    issued_at: int
    expires_at: int
    playground_key: str = ""

    def with_playground_key(self, key_id: str) -> Session:
        return replace(self, playground_key=key_id)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class SessionSigner:
    """Issues and checks session tokens with one secret; sessions last ``ttl_s`` seconds."""

    def __init__(self, secret: bytes | str | None, ttl_s: float) -> None:
        if ttl_s <= 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s}")
        if isinstance(secret, str):
            secret = secret.encode()
        self._secret = secret or secrets.token_bytes(32)
        self.ttl_s = ttl_s

    def new_session(
        self, kind: Kind, subject: str, name: str, key_prefix: str = "", *, now: float | None = None
    ) -> Session:
        issued = int(now if now is not None else time.time())
        return Session(
            sid=secrets.token_urlsafe(12),
            kind=kind,
            subject=subject,
            name=name,
            key_prefix=key_prefix,
            issued_at=issued,
            expires_at=issued + max(1, int(self.ttl_s)),
        )

    def sign(self, session: Session) -> str:
        payload = json.dumps({"v": _VERSION, **asdict(session)}, separators=(",", ":"), sort_keys=True)
        body = _b64encode(payload.encode())
        return f"{body}.{self._mac(body)}"

    def verify(self, token: str | None, *, now: float | None = None) -> Session | None:
        """The session ``token`` stands for, or None when it is missing, forged, malformed or expired."""
        if not token or token.count(".") != 1:
            return None
        body, mac = token.split(".")
        if not hmac.compare_digest(mac.encode(), self._mac(body).encode()):
            return None
        try:
            data = json.loads(_b64decode(body))
            if not isinstance(data, dict) or data.pop("v", None) != _VERSION:
                return None
            session = Session(**data)
            fresh = session.expires_at > (now if now is not None else time.time())
        except (ValueError, TypeError, KeyError, binascii.Error):
            return None
        return session if fresh else None

    def _mac(self, body: str) -> str:
        return _b64encode(hmac.new(self._secret, body.encode(), hashlib.sha256).digest())
