"""The request id of the call being handled, carried in a contextvar.

Servers bind it from the ``x-request-id`` metadata (or make one); clients forward it on every
outgoing call, so one id follows a request across every hop.
"""

from __future__ import annotations

import contextvars
import uuid

REQUEST_ID_HEADER = "x-request-id"

request_id_var: contextvars.ContextVar[str | None] = contextvars.ContextVar("request_id", default=None)


def new_request_id() -> str:
    return uuid.uuid4().hex


def current_request_id() -> str | None:
    return request_id_var.get()
