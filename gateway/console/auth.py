"""Signing in to the console, and the session every /console/api route needs.

``POST /console/api/session {"key": ...}`` takes an API key (checked against the gateway's key store,
through the same cache as /v1) or the admin token, and sets the ``yard_console`` cookie: HttpOnly,
SameSite=Strict, path /console, a signed session that expires after ``console.session_ttl_s``.
A session of an API key ends as soon as the key is revoked (within ``auth.cache_ttl_s``).

The chat playground calls /v1/chat/completions from the browser with a bearer key: the API key the
user signed in with (kept in the tab's sessionStorage), or, for an admin session, a key the console
mints once per session in the key store (``POST /console/api/playground-key``, named
``console-admin``). Signing out revokes that key; keys of sessions that expired without signing out
are revoked at the next mint.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field
from sqlalchemy import select

from services.core.errors import FailedPrecondition, NotFound, Unauthenticated

from ..auth.keys import KEY_PREFIX, ApiKey, KeyStore
from ..deps import GatewayState, state
from ..settings import GatewaySettings
from ..store import api_keys
from .services import ConsoleServices
from .session import COOKIE_NAME, COOKIE_PATH, Session, SessionSigner

PLAYGROUND_KEY_NAME = "console-admin"


@dataclass
class ConsoleState:
    settings: GatewaySettings
    signer: SessionSigner
    services: ConsoleServices
    # key id -> (active, checked at monotonic time): a revoked key ends its sessions
    _key_checks: dict[str, tuple[bool, float]] = field(default_factory=dict)

    @classmethod
    def create(cls, settings: GatewaySettings) -> ConsoleState:
        secret = settings.console.session_secret.get_secret_value()
        return cls(settings, SessionSigner(secret or None, settings.console.session_ttl_s), ConsoleServices(settings))

    def remember_key(self, key_id: str) -> None:
        self._key_checks[key_id] = (True, time.monotonic())

    async def key_active(self, gateway: GatewayState, key_id: str) -> bool:
        now = time.monotonic()
        hit = self._key_checks.get(key_id)
        if hit is not None and now - hit[1] < self.settings.auth.cache_ttl_s:
            return hit[0]
        active = await asyncio.to_thread(_key_is_active, gateway, key_id)
        self._key_checks[key_id] = (active, now)
        return active


def _key_is_active(gateway: GatewayState, key_id: str) -> bool:
    with gateway.db.session() as s:
        row = s.execute(select(api_keys.c.revoked_at).where(api_keys.c.id == key_id)).first()
    return row is not None and row.revoked_at is None


def console(request: Request) -> ConsoleState:
    st: ConsoleState = request.app.state.console
    return st


async def session(request: Request) -> Session:
    """The signed-in session of this request (401 ``console_session_required`` without one)."""
    st = console(request)
    current = st.signer.verify(request.cookies.get(COOKIE_NAME))
    if current is None:
        raise Unauthenticated(
            "You are not signed in to the console (or your session expired): sign in with an API key or the "
            "admin token.",
            reason="CONSOLE_SESSION_REQUIRED",
        )
    if current.kind == "key" and not await st.key_active(state(request), current.subject):
        raise Unauthenticated(
            "The API key of this console session was revoked: sign in again.", reason="CONSOLE_SESSION_REVOKED"
        )
    return current


def set_cookie(request: Request, response: Response, st: ConsoleState, current: Session) -> None:
    response.set_cookie(
        COOKIE_NAME,
        st.signer.sign(current),
        max_age=max(1, current.expires_at - int(time.time())),
        path=COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
    )


def session_json(current: Session, **extra: object) -> dict[str, object]:
    return {
        "user": {"kind": current.kind, "name": current.name, "key_prefix": current.key_prefix},
        "expires_at": datetime.fromtimestamp(current.expires_at, UTC).isoformat(),
        **extra,
    }


router = APIRouter()


class SignIn(BaseModel):
    key: str = Field(min_length=1, max_length=512)


@router.post("/session")
async def sign_in(body: SignIn, request: Request, response: Response) -> dict[str, object]:
    st, gateway = console(request), state(request)
    secret = body.key.strip()
    if hmac.compare_digest(secret.encode(), gateway.admin_token.encode()):
        current = st.signer.new_session("admin", "admin", "admin")
    else:
        key: ApiKey | None = None
        if secret.startswith(KEY_PREFIX):
            try:
                key = await gateway.key_cache.authenticate(f"Bearer {secret}")
            except Unauthenticated:
                key = None
        if key is None:
            raise Unauthenticated(
                "Sign-in failed: that is neither an active API key (sk-yard-...) nor the admin token.",
                reason="CONSOLE_SIGN_IN_FAILED",
            )
        current = st.signer.new_session("key", key.id, key.name, key.prefix)
        st.remember_key(key.id)
    set_cookie(request, response, st, current)
    return session_json(current)


@router.get("/session")
async def whoami(current: Session = Depends(session)) -> dict[str, object]:
    return session_json(current)


@router.delete("/session")
async def sign_out(request: Request, response: Response) -> dict[str, bool]:
    st, gateway = console(request), state(request)
    current = st.signer.verify(request.cookies.get(COOKIE_NAME))
    if current is not None and current.playground_key:
        await _revoke(gateway, current.playground_key)
    response.delete_cookie(COOKIE_NAME, path=COOKIE_PATH, httponly=True, samesite="strict")
    return {"signed_out": True}


@router.post("/playground-key")
async def playground_key(
    request: Request, response: Response, current: Session = Depends(session)
) -> dict[str, object]:
    """A key for the chat playground of an admin session (a new one each call; the previous one of this
    session is revoked)."""
    if current.kind != "admin":
        raise FailedPrecondition(
            "This session signed in with an API key: the playground uses that key, which only the tab you signed "
            "in from keeps. Sign in again in this tab to chat.",
            reason="PLAYGROUND_USES_SIGN_IN_KEY",
        )
    st, gateway = console(request), state(request)
    if current.playground_key:
        await _revoke(gateway, current.playground_key)
    await asyncio.to_thread(_revoke_stale_keys, gateway.keys, st.settings.console.session_ttl_s)
    quota = st.settings.quota
    key, secret = await asyncio.to_thread(
        gateway.keys.create, PLAYGROUND_KEY_NAME, quota.default_rpm, quota.default_tpm
    )
    await gateway.key_cache.revoked()  # the stale keys revoked above, on every replica
    updated = current.with_playground_key(key.id)
    set_cookie(request, response, st, updated)
    return {"key": secret, "id": key.id, "name": key.name, "prefix": key.prefix}


async def _revoke(gateway: GatewayState, key_id: str) -> None:
    try:
        await asyncio.to_thread(gateway.keys.revoke, key_id)
    except NotFound:  # already gone: nothing to revoke
        return
    await gateway.key_cache.revoked(key_id)


def _revoke_stale_keys(keys: KeyStore, ttl_s: float) -> None:
    """Revoke playground keys older than a session (their sessions ended without signing out)."""
    cutoff = datetime.now(UTC) - timedelta(seconds=ttl_s)
    for key in keys.list(include_revoked=False):
        created = key.created_at if key.created_at.tzinfo else key.created_at.replace(tzinfo=UTC)
        if key.name == PLAYGROUND_KEY_NAME and created < cutoff:
            keys.revoke(key.id)
