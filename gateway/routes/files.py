"""/v1/files: upload (multipart, purpose ``fine-tune``), list, retrieve, delete, content (gateway/finetune/files.py)."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import APIRouter, Depends, File, Form, Query, Request, UploadFile
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from ..auth.keys import ApiKey
from ..deps import api_key
from ..errors import raw_error
from ..finetune.files import Files
from ..limits import BodyLimitMiddleware

router = APIRouter()
FILES_PATH = "/v1/files"


def files(request: Request) -> Files:
    service: Files = request.app.state.files
    return service


@router.post(FILES_PATH)
async def create_file(
    request: Request,
    file: UploadFile = File(...),
    purpose: str = Form(...),
    key: ApiKey = Depends(api_key),
) -> dict[str, Any]:
    record = await files(request).create(key.project, purpose, file.filename, file.file)
    return record.to_openai()


@router.get(FILES_PATH)
async def list_files(
    request: Request,
    purpose: str | None = Query(None, max_length=64),
    limit: int = Query(10000, ge=1, le=10000),
    after: str | None = Query(None, max_length=100),
    order: Literal["asc", "desc"] = "desc",
    key: ApiKey = Depends(api_key),
) -> dict[str, Any]:
    found, more = await files(request).list(key.project, purpose=purpose, limit=limit, after=after, order=order)
    data = [f.to_openai() for f in found]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


@router.get(FILES_PATH + "/{file_id}")
async def retrieve_file(file_id: str, request: Request, key: ApiKey = Depends(api_key)) -> dict[str, Any]:
    return (await files(request).get(key.project, file_id)).to_openai()


@router.delete(FILES_PATH + "/{file_id}")
async def delete_file(file_id: str, request: Request, key: ApiKey = Depends(api_key)) -> dict[str, Any]:
    record = await files(request).delete(key.project, file_id)
    return {"id": record.id, "object": "file", "deleted": True}


@router.get(FILES_PATH + "/{file_id}/content")
async def file_content(file_id: str, request: Request, key: ApiKey = Depends(api_key)) -> StreamingResponse:
    record, body = await files(request).content(key.project, file_id)
    return StreamingResponse(
        body,
        media_type="application/octet-stream",
        headers={
            "Content-Length": str(record.bytes),
            "Content-Disposition": f'attachment; filename="{record.id}.jsonl"',
        },
    )


class _FileBodyLimit(BodyLimitMiddleware):
    def _response(self) -> JSONResponse:
        return raw_error(
            413,
            f"The file upload is larger than {self.max_bytes} bytes (fine_tuning.max_file_bytes).",
            "invalid_request_error",
            "request_too_large",
        )


class BodyLimits:
    """The body limit of every request (``limits.max_body_bytes``), but ``fine_tuning.max_file_bytes`` (plus the
    multipart framing) for ``POST /v1/files``: datasets are larger than API requests."""

    FRAMING = 64 * 1024

    def __init__(self, app: ASGIApp, max_bytes: int, max_file_bytes: int) -> None:
        self.default = BodyLimitMiddleware(app, max_bytes)
        self.files = _FileBodyLimit(app, max_file_bytes + self.FRAMING)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        upload = scope["type"] == "http" and scope["path"] == FILES_PATH and scope["method"] == "POST"
        await (self.files if upload else self.default)(scope, receive, send)
