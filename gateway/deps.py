"""Request dependencies shared by the routes: the app's state, authentication, the call context."""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass

from fastapi import Depends, Request

from services.core.db import Database
from services.core.errors import Unauthenticated

from .auth.keys import ANONYMOUS, ApiKey, KeyCache, KeyStore
from .auth.projects import ALLOW_ALL, ModelAccess, ProjectCache, ProjectStore
from .quota import UsageRecorder
from .routing import Router
from .serving import CallContext, ServingChat, ServingCompletion, ServingEmbedding, ServingModels
from .settings import GatewaySettings


@dataclass
class GatewayState:
    settings: GatewaySettings
    router: Router
    usage: UsageRecorder
    chat: ServingChat
    completions: ServingCompletion
    embeddings: ServingEmbedding
    models: ServingModels
    db: Database
    keys: KeyStore
    key_cache: KeyCache
    admin_token: str
    auth_required: bool
    projects: ProjectStore
    project_cache: ProjectCache


def state(request: Request) -> GatewayState:
    gateway: GatewayState = request.app.state.gateway
    return gateway


async def api_key(request: Request) -> ApiKey:
    """The caller's key (ANONYMOUS when auth is disabled). Cached: no database on a hit."""
    st = state(request)
    if not st.auth_required:
        return ANONYMOUS
    return await st.key_cache.authenticate(request.headers.get("authorization"))


async def model_access(request: Request, key: ApiKey = Depends(api_key)) -> ModelAccess:
    """The models the caller's project may use (every model when auth is disabled). Cached."""
    st = state(request)
    if not st.auth_required:
        return ALLOW_ALL
    return await st.project_cache.access(key.project)


def admin(request: Request) -> None:
    """Admin endpoints need ``Authorization: Bearer <admin token>``."""
    header = request.headers.get("authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), state(request).admin_token.encode()
    ):
        raise Unauthenticated(
            "admin endpoints need 'Authorization: Bearer <admin token>' (YARD_GATEWAY_ADMIN_TOKEN "
            "or <data_dir>/admin_token)",
            reason="INVALID_ADMIN_TOKEN",
        )


def call_context(request: Request, key: ApiKey, model: str, endpoint: str, access: ModelAccess) -> CallContext:
    request.scope.setdefault("state", {})["model"] = model
    return CallContext(
        request_id=request.scope["state"]["request_id"],
        key=key,
        model=model,
        endpoint=endpoint,
        started=request.scope["state"].get("started", time.perf_counter()),
        access=access,
    )
