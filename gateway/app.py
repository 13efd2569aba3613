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
from services.core.errors import DomainError, FailedPrecondition, FieldViolation, InvalidArgument
from services.core.logging import get_logger

from .auth.keys import KeyCache, KeyStore
from .auth.projects import ProjectCache, ProjectStore
from .console import install_console
from .content_filter import ContentFilter
from .deps import GatewayState
from .drain import Drain, DrainMiddleware
from .errors import error_response, raw_error
from .finetune.files import Files
from .finetune.jobs import Clients, FineTuning
from .metrics import LATENCY, REQUESTS, labelled, model_label
from .openapi import allowed_methods, build_openapi
from .quota import QuotaLimiter, UsageRecorder
from .routes import admin, chat, completions, embeddings, files, fine_tuning, health, models
from .routing import Router
from .serving import ServingChat, ServingCompletion, ServingEmbedding, ServingModels
from .settings import GatewaySettings
from .shared_state import SharedState
from .store import open_database

log = get_logger("modelyard.gateway")

_VALID_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:\-]{1,128}$")
_ENDPOINTS = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/models"}
_QUIET = {"/healthz", "/readyz", "/metrics"}  # probes and scrapes: metrics only, no access log line
_requests, _latency = labelled(REQUESTS), labelled(LATENCY)
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "function-after", "function-before"}


def admin_token(settings: GatewaySettings) -> str:
    """The configured admin token, or the one in ``admin_token_file`` (default <data_dir>/admin_token):
    read when the file exists, generated and written (0600) only when it does not. The file appears
    whole or not at all (written aside, then hard-linked in place, which fails if another process got
    there first), so replicas starting together on one data dir all end up with the same token."""
    token = settings.admin_token.get_secret_value()
    if token:
        return token
    path: Path = settings.admin_token_file or settings.data_dir / "admin_token"
    path.parent.mkdir(parents=True, exist_ok=True)
    existing = _read_token(path)
    if existing:
        return existing
    token = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(token)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)
        except FileExistsError:
            return _winner(path)  # another replica won the race: use its token
        except OSError:  # a file system without hard links: create the file itself, exclusively
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                return _winner(path)
            with os.fdopen(fd, "w") as f:
                f.write(token)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("admin_token_written", path=str(path))
    return token


def _winner(path: Path, wait_s: float = 2.0) -> str:
    """The token another process wrote to ``path`` (waiting a moment for its content when the file was
    created in place rather than linked)."""
    deadline = time.monotonic() + wait_s
    while not (token := _read_token(path)):
        if time.monotonic() > deadline:
            raise FailedPrecondition(f"the admin token file {path} is empty", reason="ADMIN_TOKEN_EMPTY")
        time.sleep(0.05)
    return token


def _read_token(path: Path) -> str:
    """The token in ``path`` ("" when there is no such file); warns when others may read it."""
    try:
        mode = path.stat().st_mode
        token = path.read_text().strip()
    except FileNotFoundError:
        return ""
    if mode & 0o077:
        log.warning("admin_token_file_readable_by_others", path=str(path), mode=oct(mode & 0o777))
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
        label = model_label(model, _known_models(scope))  # never a name no deployment has
        _requests(endpoint, label, str(status)).inc()
        _latency(endpoint, label).observe(elapsed)
        if path not in _QUIET:
            log.info(
                "request_finished",
                method=scope["method"],
                path=path,
                status=status,
                model=model or None,
                ms=round(elapsed * 1000, 2),
            )


def _known_models(scope: Scope) -> list[set[str]]:
    """The model names each inference replica has (ready or not), from the app's routing table."""
    gateway = getattr(getattr(scope.get("app"), "state", None), "gateway", None)
    return [] if gateway is None else [r.known for r in gateway.router.replicas]


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
            response = raw_error(
                405,
                f"Method {request.method} is not allowed for {request.url.path}.",
                "invalid_request_error",
                "method_not_allowed",
            )
            response.headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))  # RFC 9110
            return response
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
        router = Router(
            settings.inference_addrs, settings.timeouts, settings.routing, credentials=settings.service_credentials()
        )
        usage = UsageRecorder(db, settings.quota.usage_flush_s)
        keys = KeyStore(db)
        projects = ProjectStore(db)
        # Redis configured: rate limits and revocations shared by every replica (gateway/shared_state.py)
        redis_state = SharedState(settings.redis) if settings.redis.url else None
        limiter = QuotaLimiter(redis_state.windows if redis_state else None, fail_open=settings.redis.fail_open)
        key_cache = KeyCache(
            keys,
            settings.auth.cache_ttl_s,
            settings.auth.negative_cache_ttl_s,
            max_entries=settings.auth.cache_max_entries,
            negative_max_entries=settings.auth.negative_cache_max_entries,
            revocations=redis_state.revocations if redis_state else None,
        )
        shared = (settings, router, limiter, usage, ContentFilter(settings.blocked_terms))
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
            key_cache=key_cache,
            admin_token=admin_token(settings),
            auth_required=settings.auth.required,
            projects=projects,
            project_cache=ProjectCache(projects, settings.auth.cache_ttl_s),
        )
        ft_clients = Clients(settings)  # /v1/files and /v1/fine_tuning/jobs (gateway/finetune/)
        app.state.files = Files(
            db,
            ft_clients.registry,
            max_bytes=settings.fine_tuning.max_file_bytes,
            timeout_s=settings.fine_tuning.rpc_timeout_s,
            staging=settings.data_dir / "uploads",
        )
        app.state.fine_tuning = FineTuning(
            settings, db, router, app.state.files.store, ft_clients, projects, app.state.gateway.project_cache
        )
        await router.start()
        await usage.start()
        await app.state.fine_tuning.start()
        if redis_state is not None:
            redis_state.start(key_cache)
        log.info("gateway_started", replicas=settings.inference_addrs, auth_required=settings.auth.required)
        try:
            yield
        finally:
            await app.state.fine_tuning.stop()
            if redis_state is not None:
                await redis_state.stop()
            await usage.stop()
            await router.stop()
            db.dispose()

    app = FastAPI(
        title="ModelYard gateway", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url="/openapi.json"
    )
    app.openapi = lambda: build_openapi(app)  # type: ignore[method-assign]
    app.state.drain = drain = Drain()  # begun by python -m gateway on SIGTERM (gateway/drain.py)
    install_error_handlers(app)
    for module in (models, chat, completions, embeddings, files, fine_tuning, admin, health):
        app.include_router(module.router)
    if settings.console.enabled:
        install_console(app, settings)
    app.add_middleware(  # limits.max_body_bytes; fine_tuning.max_file_bytes for POST /v1/files
        files.BodyLimits, max_bytes=settings.limits.max_body_bytes, max_file_bytes=settings.fine_tuning.max_file_bytes
    )
    app.add_middleware(DrainMiddleware, drain=drain)
    app.add_middleware(RequestIdMiddleware)  # outermost: a 413 carries the request id and is counted
    return app
