"""The FastAPI app: lifespan (database, routing table, usage writer), the request-id middleware,
OpenAI-shaped error handlers for every failure, and the routes."""

from __future__ import annotations

import os
import re
import secrets
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from services.core.context import REQUEST_ID_HEADER, new_request_id, request_id_var
from services.core.errors import DomainError, FieldViolation, InvalidArgument
from services.core.logging import get_logger

from .auth.keys import KeyCache, KeyStore
from .content_filter import ContentFilter
from .deps import GatewayState
from .errors import error_response, raw_error
from .metrics import LATENCY, REQUESTS, labelled
from .quota import QuotaLimiter, UsageRecorder
from .routes import admin, chat, completions, embeddings, health, models
from .routing import Router
from .serving import ServingChat, ServingCompletion, ServingEmbedding, ServingModels
from .settings import GatewaySettings
from .store import open_database

log = get_logger("modelyard.gateway")

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"}
_QUIET = {"/healthz", "/readyz", "/metrics"}  # probes and scrapes: metrics only, no access log line
_requests, _latency = labelled(REQUESTS), labelled(LATENCY)
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def admin_token(settings: GatewaySettings) -> str:
    """The configured admin token, or one generated now and written to <data_dir>/admin_token (0600)."""
    token = settings.admin_token.get_secret_value()
    if token:
        return token
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    path: Path = settings.data_dir / "admin_token"
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    log.info("admin_token_written", path=str(path))
    return token


class RequestIdMiddleware:
    """Pure ASGI (no buffering): binds the request id (X-Request-Id, or a new one) for the whole
    request, so every log line written while handling it carries ``request_id`` (structlog's
    contextvars); echoes it on the response; records the request count and latency per endpoint,
    model and status; and writes one access log line (``request_finished``) per API request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v.decode("latin-1") for k, v in scope["headers"] if k == b"x-request-id"), None)
        request_id = incoming if incoming and _VALID_REQUEST_ID.match(incoming) else new_request_id()
        state = scope.setdefault("state", {})
        state["request_id"], state["started"] = request_id, time.perf_counter()
        token = request_id_var.set(request_id)
        bound = structlog.contextvars.bind_contextvars(request_id=request_id)
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        except BaseException:
            # Left bound: the server's own log of this error (after the 500 is sent) names the
            # request too. Each request runs in a task of its own, so nothing leaks to the next.
            self._finished(scope, state, status)
            raise
        self._finished(scope, state, status)
        structlog.contextvars.reset_contextvars(**bound)
        request_id_var.reset(token)

    @staticmethod
    def _finished(scope: Scope, state: dict, status: int) -> None:
        path = scope["path"]
        endpoint = path if path in _ENDPOINTS else "other"
        model = state.get("model", "")
        elapsed = time.perf_counter() - state["started"]
        _requests(endpoint, model, str(status)).inc()
        _latency(endpoint, model).observe(elapsed)
        if path not in _QUIET:
            log.info(
                "request_finished",
                method=scope["method"],
                path=path,
                status=status,
                model=model or None,
                ms=round(elapsed * 1000, 2),
            )


def _param(loc: tuple) -> str | None:
    """Pydantic's error location as an OpenAI ``param``: ``messages[0].role``."""
    parts = [x for x in loc[1:] if not (isinstance(x, str) and (x in _TYPE_TAGS or "[" in x or "-" in x))]
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(DomainError)
    async def domain_error(request: Request, exc: DomainError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = exc.errors()
        first: dict[str, Any] = (
            dict(errors[0]) if errors else {"loc": ("body",), "msg": "invalid request", "type": "value_error"}
        )
        if first["type"] == "json_invalid":
            return error_response(
                InvalidArgument(
                    "We could not parse the JSON body of your request: "
                    f"{first.get('ctx', {}).get('error', first['msg'])}"
                )
            )
        param = _param(tuple(first["loc"]))
        msg = str(first["msg"]).removeprefix("Value error, ")
        if param is None:
            return error_response(InvalidArgument(f"invalid request body: {msg}"))
        value = first.get("input")
        shown = f" (got {value!r})" if first["type"] != "missing" and not isinstance(value, dict | list) else ""
        description = f"{msg}{shown}"
        return error_response(
            InvalidArgument(
                f"Invalid value for '{param}': {description}", violations=[FieldViolation(param, description)]
            )
        )

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return raw_error(
                404,
                f"Unknown request URL: {request.method} {request.url.path}.",
                "invalid_request_error",
                "unknown_url",
            )
        if exc.status_code == 405:
            return raw_error(
                405,
                f"Method {request.method} is not allowed for {request.url.path}.",
                "invalid_request_error",
                "method_not_allowed",
            )
        return raw_error(exc.status_code, str(exc.detail), "invalid_request_error", None)

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        request_id = request.scope.get("state", {}).get("request_id")
        log.exception("request_failed", request_id=request_id, path=request.url.path)
        return raw_error(
            500,
            f"The server had an error while processing your request (request id {request_id}).",
            "server_error",
            None,
        )


def create_app(settings: GatewaySettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        db = open_database(settings.db_url())
        router = Router(settings.inference_addrs, settings.timeouts, settings.routing)
        usage = UsageRecorder(db, settings.quota.usage_flush_s)
        keys = KeyStore(db)
        shared = (settings, router, QuotaLimiter(), usage, ContentFilter(settings.blocked_terms))
        app.state.gateway = GatewayState(
            settings=settings,
            router=router,
            usage=usage,
            chat=ServingChat(*shared),
            completions=ServingCompletion(*shared),
            embeddings=ServingEmbedding(*shared),
            models=ServingModels(router),
            db=db,
            keys=keys,
            key_cache=KeyCache(keys, settings.auth.cache_ttl_s, settings.auth.negative_cache_ttl_s),
            admin_token=admin_token(settings),
            auth_required=settings.auth.required,
        )
        await router.start()
        await usage.start()
        log.info("gateway_started", replicas=settings.inference_addrs, auth_required=settings.auth.required)
        try:
            yield
        finally:
            await usage.stop()
            await router.stop()
            db.dispose()

    app = FastAPI(title="ModelYard gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)
    for module in (models, chat, completions, embeddings, admin, health):
        app.include_router(module.router)
    app.add_middleware(RequestIdMiddleware)
    return app
