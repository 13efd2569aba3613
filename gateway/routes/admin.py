"""Admin endpoints (``Authorization: Bearer <admin token>``): projects, API keys and usage, for
`yard projects` / `yard keys` / `yard usage`."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Request
from pydantic import AfterValidator, BaseModel, Field

from ..auth.keys import ApiKey
from ..auth.projects import Project, check_project_name
from ..deps import admin, state
from ..store import DEFAULT_PROJECT

router = APIRouter(prefix="/admin", dependencies=[Depends(admin)])


class CreateKey(BaseModel):
    name: str = Field(min_length=1, max_length=200)
    rpm: int | None = Field(default=None, ge=0, strict=True)  # strict: JSON false is not a limit of 0
    tpm: int | None = Field(default=None, ge=0, strict=True)
    project: str = Field(default=DEFAULT_PROJECT, min_length=1, max_length=64)  # must exist


def _aware(value: datetime) -> datetime:
    """Times are UTC; SQLite hands them back without their timezone."""
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value


UtcDatetime = Annotated[datetime, AfterValidator(_aware)]


class KeyOut(BaseModel):
    id: str
    name: str
    prefix: str
    rpm: int
    tpm: int
    created_at: UtcDatetime
    revoked_at: UtcDatetime | None
    project: str

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
    key, secret = await asyncio.to_thread(st.keys.create, body.name, rpm, tpm, body.project)
    return CreatedKey(**KeyOut.of(key).model_dump(), key=secret)


@router.get("/keys")
async def list_keys(request: Request, project: str | None = None) -> dict[str, list[KeyOut]]:
    """Every key, or those of one project."""
    keys = await asyncio.to_thread(state(request).keys.list, True, project)
    return {"data": [KeyOut.of(k) for k in keys]}


@router.post("/keys/{key_id}/revoke")
async def revoke_key(key_id: str, request: Request) -> KeyOut:
    st = state(request)
    key = await asyncio.to_thread(st.keys.revoke, key_id)
    # here at once; other replicas within redis.revocation_max_delay_s (with Redis) or auth.cache_ttl_s
    await st.key_cache.revoked(key.id)
    return KeyOut.of(key)


@router.get("/usage")
async def usage(
    request: Request,
    key: str | None = None,
    project: str | None = None,
    group_by: Literal["key", "project"] = "key",
) -> dict[str, list[dict]]:
    """Requests and tokens per key (``key_id``) or per project (``group_by=project``) and model, of
    every key or of one key or project."""
    recorder = state(request).usage
    await recorder.flush()
    return {"data": await asyncio.to_thread(recorder.totals, key, project, group_by)}


# ---------------------------------------------------------------- projects


class CreateProject(BaseModel):
    name: str = Field(min_length=1, max_length=64)
    # "*", "<model>", "<model>:<adapter>", "<model>:*" (gateway/auth/projects.py)
    models: list[str] = Field(default_factory=list, max_length=1000)


class SetModels(BaseModel):
    models: list[str] = Field(max_length=1000)


class ChangeModels(BaseModel):
    add_models: list[str] = Field(default_factory=list, max_length=1000)
    remove_models: list[str] = Field(default_factory=list, max_length=1000)


class ProjectOut(BaseModel):
    name: str
    models: list[str]
    created_at: UtcDatetime
    updated_at: UtcDatetime

    @classmethod
    def of(cls, project: Project) -> ProjectOut:
        return cls(
            name=project.name, models=list(project.models), created_at=project.created_at, updated_at=project.updated_at
        )


@router.post("/projects", status_code=201)
async def create_project(body: CreateProject, request: Request) -> ProjectOut:
    st = state(request)
    project = await asyncio.to_thread(st.projects.create, body.name, body.models)
    st.project_cache.invalidate()
    return ProjectOut.of(project)


@router.get("/projects")
async def list_projects(request: Request) -> dict[str, list[ProjectOut]]:
    projects = await asyncio.to_thread(state(request).projects.list)
    return {"data": [ProjectOut.of(p) for p in projects]}


@router.get("/projects/{name}")
async def get_project(name: str, request: Request) -> ProjectOut:
    check_project_name(name)
    return ProjectOut.of(await asyncio.to_thread(state(request).projects.get, name))


@router.put("/projects/{name}/models")
async def set_models(name: str, body: SetModels, request: Request) -> ProjectOut:
    """Replace the project's allowed models (here at once; other replicas within auth.cache_ttl_s)."""
    st = state(request)
    check_project_name(name)
    project = await asyncio.to_thread(lambda: st.projects.update_models(name, replace=body.models))
    st.project_cache.invalidate()
    return ProjectOut.of(project)


@router.patch("/projects/{name}/models")
async def change_models(name: str, body: ChangeModels, request: Request) -> ProjectOut:
    """Add and remove allowed models in one step."""
    st = state(request)
    check_project_name(name)
    project = await asyncio.to_thread(
        lambda: st.projects.update_models(name, add=body.add_models, remove=body.remove_models)
    )
    st.project_cache.invalidate()
    return ProjectOut.of(project)
