"""Schemathesis hooks of tests/reliability/test_openapi_schemathesis.py (loaded through the config's
``hooks``): one more check, every error answer of the gateway is in the OpenAI error shape."""

from __future__ import annotations

import json

import schemathesis


@schemathesis.check
def openai_error_shape(ctx, response, case) -> bool | None:
    """A 4xx/5xx answer is JSON ``{"error": {"message", "type", "param", "code"}}`` with a message."""
    if response.status_code < 400:
        return None
    try:
        body = json.loads(response.content)
    except ValueError:
        raise AssertionError(f"{response.status_code} answer is not JSON: {response.content[:200]!r}") from None
    error = body.get("error") if isinstance(body, dict) else None
    if not (isinstance(error, dict) and set(error) == {"message", "type", "param", "code"}
            and isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)):
        raise AssertionError(f"{response.status_code} answer is not in the OpenAI error shape: {body!r}"[:500])
    return None
