"""The route class of the generation endpoints (``POST /v1/chat/completions``, ``/v1/completions``): the
request path with as little framework work as possible.

FastAPI's request handler reads the body, parses it with ``json``, validates the Python objects, and
solves the dependencies (the API key, the project's model access) through its dependency machinery,
for every request. ``JsonBodyRoute`` keeps the route as declared (its OpenAPI operation is generated
from the endpoint's signature as before) but answers a request whose body is JSON with its own
handler: the body validated straight from its bytes (``model_validate_json``), the key and the model
access resolved by direct calls, then the endpoint. Whatever is not that plain case — a body that
does not validate, an empty one, another content type — goes to FastAPI's own handler, so the error
answers (the OpenAI error JSON of ``app.install_error_handlers``) are exactly FastAPI's.

The endpoint must take ``body`` (a pydantic model), ``request``, ``key`` (``Depends(api_key)``) and
``access`` (``Depends(model_access)``), and nothing else.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import Any

from fastapi import Request, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, ValidationError

from ..deps import api_key, model_access

Handler = Callable[[Request], Coroutine[Any, Any, Response]]


def _is_json(content_type: str | None) -> bool:
    """``application/json`` (parameters allowed): the only type the fast path takes."""
    return content_type is not None and content_type.partition(";")[0].strip().lower() == "application/json"


class JsonBodyRoute(APIRoute):
    def get_route_handler(self) -> Handler:
        standard = super().get_route_handler()
        assert self.body_field is not None, f"{self.path}: JsonBodyRoute needs a body parameter"
        model: type[BaseModel] = self.body_field.field_info.annotation  # type: ignore[assignment]
        endpoint = self.endpoint

        async def handler(request: Request) -> Response:
            if not _is_json(request.headers.get("content-type")):
                return await standard(request)
            raw = await request.body()  # kept on the request: the standard handler reads it again
            if not raw:
                return await standard(request)
            try:
                body = model.model_validate_json(raw)
            except ValidationError:
                # the answer exactly as FastAPI gives it (which checks the key first, as it should)
                return await standard(request)
            key = await api_key(request)
            access = await model_access(request, key)
            response: Response = await endpoint(body=body, request=request, key=key, access=access)
            return response

        return handler
