"""Admin endpoints (``Authorization: Bearer <admin token>``): API keys and usage, for `yard keys` / `yard usage`."""

from __future__ import annotations

import asyncio
from datetime import datetime

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, Field

from ..auth.keys import ApiKey
from ..deps import admin, state

router = APIRouter(prefix="/admin", dependencies=[Depends(admin)])


class CreateKey(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    rpm: int | None = Field(default=None, ge=0)
    tpm: int | None = Field(default=None, ge=0)


class KeyOut(BaseModel):
    id: str
    name: str
    prefix: str
    rpm: int
    tpm: int
    created_at: datetime
    revoked_at: datetime | None

    @classmethod
    def of(cls, key: ApiKey) -> KeyOut:
        return cls.model_validate(key, from_attributes=True)


class CreatedKey(KeyOut):
    key: str  # the secret, returned this once


@router.post("/keys", status_code=201)
async def create_key(body: CreateKey, request: Request) -> CreatedKey:
    st = state(request)
    quota = st.settings.quota
    rpm = quota.default_rpm if body.rpm is None else body.rpm
    tpm = quota.default_tpm if body.tpm is None else body.tpm
    key, secret = await asyncio.to_thread(st.keys.create, body.name, rpm, tpm)
    return CreatedKey(**KeyOut.of(key).model_dump(), key=secret)


@router.get("/keys")
async def list_keys(request: Request) -> dict[str, list[KeyOut]]:
    keys = await asyncio.to_thread(state(request).keys.list)
    return {"data": [KeyOut.of(k) for k in keys]}


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: str, request: Request) -> KeyOut:
    st = state(request)
    key = await asyncio.to_thread(st.keys.revoke, key_id)
    st.key_cache.invalidate()  # here at once; other gateway replicas within auth.cache_ttl_s
    return KeyOut.of(key)


@router.get("/usage")
async def usage(request: Request, key: str | None = None) -> dict[str, list[dict]]:
    recorder = state(request).usage
    await recorder.flush()
    return {"data": await asyncio.to_thread(recorder.totals, key)}
