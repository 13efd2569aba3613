"""The gateway's OpenAPI document (``GET /openapi.json``): the OpenAI API and the admin API, with
every error response documented.

FastAPI's generated document is taken and completed:

- only the API is described (``/v1/...`` and ``/admin/...``): the probes (``/healthz``, ``/readyz``,
  ``/metrics``) and the web console are not part of it;
- FastAPI's 422 ``HTTPValidationError`` is gone: a request that does not validate is a 400 in the
  OpenAI error shape, like every other error;
- each error status an operation can answer refers to one of ``components.responses`` (``BadRequest``,
  ``Unauthorized``, ``NotFound``, ``PayloadTooLarge``, ``RateLimited``, ...), all carrying the
  ``ErrorResponse`` schema ``{"error": {"message", "type", "param", "code"}}``; 405 (with its ``Allow``
  header) is in the components too, for a method a path does not have;
- the streaming endpoints document their ``text/event-stream`` answer beside the JSON one;
- the API keys (``bearerAuth``) and the admin token (``adminToken``) are security schemes.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from starlette.routing import Match
from starlette.types import Scope

DOCUMENTED_PREFIXES = ("/v1/", "/admin/")
STREAMING_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

# One event of a streamed answer (``"stream": true``), as SSE parsers see it.
SSE_EVENT: dict[str, Any] = {
    "type": "object",
    "required": ["data"],
    "properties": {
        "data": {
            "type": "string",
            "description": 'A chunk as JSON; an error mid-stream as {"error": {...}}; [DONE] last.',
        },
        "event": {"type": "string"},
    },
}

# status -> (component name, description)
ERRORS: dict[str, tuple[str, str]] = {
    "400": ("BadRequest", "The request is invalid (type invalid_request_error; param names the field)."),
    "401": ("Unauthorized", "No API key, an unknown or revoked one (code invalid_api_key), or a wrong admin token."),
    "403": ("Forbidden", "The key may not do this (type permission_error)."),
    "404": ("NotFound", "No such model, or no such resource (code model_not_found / not_found)."),
    "405": ("MethodNotAllowed", "The path has no such method; the Allow header lists those it has."),
    "409": ("Conflict", "The resource exists already, or changed meanwhile."),
    "413": ("PayloadTooLarge", "The request body is larger than the gateway accepts (limits.max_body_bytes)."),
    "429": ("RateLimited", "The key's requests or tokens per minute are used up; see Retry-After."),
    "500": ("InternalError", "An error of ours (type server_error); the message names the request id."),
    "501": ("NotImplemented", "The deployment's engine does not offer this (code unsupported)."),
    "503": ("Unavailable", "No ready replica serves the model now, or this gateway is draining; retry later."),
    "504": ("Timeout", "The engine did not answer in time (first token or between two chunks)."),
}
HEADERS: dict[str, dict[str, Any]] = {
    "405": {"Allow": {"description": "The methods the path has.", "schema": {"type": "string"}}},
    "429": {
        "Retry-After": {"description": "Seconds until a retry may succeed.", "schema": {"type": "string"}},
    },
    "503": {"Retry-After": {"description": "Seconds to wait before retrying.", "schema": {"type": "string"}}},
}


def error_statuses(path: str, method: str, has_body: bool) -> list[str]:
    """The error statuses an operation can answer."""
    statuses = ["400", "401", "404", "500", "503"]
    if has_body:
        statuses.append("413")
    if path.startswith("/v1/"):
        statuses += ["403", "429", "501", "504"]
    if path.startswith("/admin/") and method == "post":
        statuses.append("409")
    return sorted(statuses)


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The document (built once, then cached on the app as FastAPI does)."""
    if app.openapi_schema is not None:
        return app.openapi_schema
    doc = get_openapi(
        title=app.title,
        version="1",
        summary="OpenAI-compatible API of ModelYard's deployments, and the admin API of its keys and usage.",
        routes=app.routes,
    )
    doc["paths"] = {path: item for path, item in doc.get("paths", {}).items() if path.startswith(DOCUMENTED_PREFIXES)}
    components = doc.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):
        schemas.pop(name, None)
    schemas["ErrorResponse"] = ERROR_SCHEMA
    responses = components.setdefault("responses", {})
    for status, (name, description) in ERRORS.items():
        response: dict[str, Any] = {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}},
        }
        if status in HEADERS:
            response["headers"] = HEADERS[status]
        responses[name] = response
    components["securitySchemes"] = {
        "bearerAuth": {"type": "http", "scheme": "bearer", "description": "An API key (sk-yard-...)."},
        "adminToken": {"type": "http", "scheme": "bearer", "description": "The gateway's admin token."},
    }
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            op_responses = op["responses"]
            op_responses.pop("422", None)
            for status in error_statuses(path, method, "requestBody" in op):
                op_responses[status] = {"$ref": f"#/components/responses/{ERRORS[status][0]}"}
            op["security"] = [{"adminToken": []}] if path.startswith("/admin/") else [{"bearerAuth": []}]
            if path in STREAMING_PATHS and method == "post":
                ok = next((op_responses[s] for s in ("200", "201") if s in op_responses), None)
                if ok is not None:
                    ok.setdefault("content", {})["text/event-stream"] = {"schema": SSE_EVENT}
    app.openapi_schema = doc
    return doc


HTTP_METHODS = ("DELETE", "GET", "HEAD", "OPTIONS", "PATCH", "POST", "PUT")


def allowed_methods(app: Any, scope: Scope) -> list[str]:
    """The methods some route answers on ``scope``'s path (the ``Allow`` header of a 405): each method
    asked of the app's router as the request would be (included routers are matched as they are)."""
    return [
        method
        for method in HTTP_METHODS
        if any(route.matches({**scope, "method": method})[0] == Match.FULL for route in app.router.routes)
    ]
