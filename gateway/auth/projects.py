"""Projects: every API key belongs to one, and a project is allowed a set of models.

A project's ``models`` are entries matched against the OpenAI ``model`` name of a request:

- ``*``: every model (the ``default`` project, made by the migration that introduced projects, has it,
  so keys created before projects, or without one, keep reaching everything);
- ``<name>``: a deployment's base model (its served name, or its id);
- ``<name>:<adapter>``: one LoRA adapter of that deployment;
- ``<name>:*``: every adapter of that deployment (not its base model).

A model the project is not allowed is answered exactly as a model that does not exist (404
``model_not_found``), on every endpoint, and is left out of ``/v1/models``.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from services.core.db import Database, utcnow
from services.core.errors import AlreadyExists, InvalidArgument, NotFound

from ..store import DEFAULT_PROJECT, projects

PROJECT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
_NAME = r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}"  # a served model name or an adapter alias (inference rules)
MODEL_ENTRY_RE = re.compile(rf"^(\*|{_NAME}(:({_NAME}|\*))?)$")
MAX_ENTRIES = 1000


@dataclass(frozen=True)
class Project:
    name: str
    models: tuple[str, ...]
    created_at: datetime
    updated_at: datetime
    _allowed: frozenset[str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_allowed", frozenset(self.models))

    def allows(self, model: str) -> bool:
        allowed = self._allowed
        if "*" in allowed or model in allowed:
            return True
        base, sep, _ = model.partition(":")
        return bool(sep) and f"{base}:*" in allowed


class ModelAccess:
    """What one caller may reach: its project's entries (or everything, when auth is off)."""

    __slots__ = ("project", "_project")

    def __init__(self, project: Project | None, name: str) -> None:
        self._project = project
        self.project = name

    def allows(self, model: str) -> bool:
        return self._project is not None and self._project.allows(model)

    def check(self, model: str) -> None:
        """404 ``model_not_found`` (the answer to a model that does not exist) unless allowed."""
        if not self.allows(model):
            raise model_not_found(model)


def model_not_found(model: str) -> NotFound:
    """The 404 of a model that does not exist, word for word as the router's (``Router.resolve``), so a
    caller cannot tell a model its project may not use from one that is not there."""
    return NotFound(
        f"The model '{model}' does not exist or you do not have access to it.",
        reason="MODEL_NOT_FOUND",
        metadata={"model": model},
    )


ALLOW_ALL = ModelAccess(Project(DEFAULT_PROJECT, ("*",), utcnow(), utcnow()), DEFAULT_PROJECT)


def check_project_name(name: str, field_name: str = "name") -> str:
    if not PROJECT_NAME_RE.match(name):
        raise InvalidArgument.for_field(
            field_name,
            f"lowercase letters, digits, '.', '_' and '-', 1-64 characters, starting with a letter or "
            f"digit; got {name[:80]!r}",
        )
    return name


def check_models(models: list[str], field_name: str = "models") -> tuple[str, ...]:
    """The entries, validated, without duplicates, in their given order."""
    if len(models) > MAX_ENTRIES:
        raise InvalidArgument.for_field(field_name, f"at most {MAX_ENTRIES} entries")
    out: dict[str, None] = {}
    for i, entry in enumerate(models):
        entry = entry.strip()
        if not MODEL_ENTRY_RE.match(entry):
            raise InvalidArgument.for_field(
                f"{field_name}[{i}]",
                "must be '*', '<model>', '<model>:<adapter>' or '<model>:*' (letters, digits, '.', '_', '-'; "
                f"at most 64 characters each); got {entry[:80]!r}",
            )
        out[entry] = None
    return tuple(out)


def _row_to_project(row) -> Project:
    return Project(
        name=row.name, models=tuple(json.loads(row.models)), created_at=row.created_at, updated_at=row.updated_at
    )


def _not_found(name: str) -> NotFound:
    return NotFound(f"project {name!r} not found", reason="PROJECT_NOT_FOUND", metadata={"project": name})


class ProjectStore:
    """Projects in the gateway database (blocking calls: run them off the event loop)."""

    def __init__(self, db: Database) -> None:
        self._db = db

    def create(self, name: str, models: list[str]) -> Project:
        check_project_name(name)
        entries = check_models(models)
        now = utcnow()
        exists = AlreadyExists(f"project {name!r} already exists", reason="PROJECT_EXISTS", metadata={"project": name})
        try:
            with self._db.session() as s:
                if s.execute(select(projects.c.name).where(projects.c.name == name)).first() is not None:
                    raise exists
                s.execute(
                    projects.insert().values(
                        name=name, models=json.dumps(list(entries)), created_at=now, updated_at=now
                    )
                )
        except IntegrityError:  # created by a concurrent call between the check and the insert
            raise exists from None
        return Project(name, entries, now, now)

    def get(self, name: str) -> Project:
        with self._db.session() as s:
            row = s.execute(select(projects).where(projects.c.name == name)).first()
        if row is None:
            raise _not_found(name)
        return _row_to_project(row)

    def update_models(
        self,
        name: str,
        *,
        replace: list[str] | None = None,
        add: list[str] | None = None,
        remove: list[str] | None = None,
    ) -> Project:
        """Replace the entries, or add and remove some, in one transaction (the row is locked on
        PostgreSQL, so two admins' changes never overwrite each other)."""
        new = check_models(replace, "models") if replace is not None else None
        added = check_models(add or [], "add_models")
        removed = set(check_models(remove or [], "remove_models"))
        with self._db.session() as s:
            row = s.execute(select(projects).where(projects.c.name == name).with_for_update()).first()
            if row is None:
                raise _not_found(name)
            entries = list(new if new is not None else json.loads(row.models))
            entries = [e for e in dict.fromkeys([*entries, *added]) if e not in removed]
            if len(entries) > MAX_ENTRIES:
                raise InvalidArgument.for_field("add_models", f"a project has at most {MAX_ENTRIES} entries")
            now = utcnow()
            s.execute(
                update(projects).where(projects.c.name == name).values(models=json.dumps(entries), updated_at=now)
            )
        return Project(name, tuple(entries), row.created_at, now)

    def list(self) -> list[Project]:
        with self._db.session() as s:
            return [_row_to_project(r) for r in s.execute(select(projects).order_by(projects.c.name))]

    def exists(self, name: str) -> bool:
        with self._db.session() as s:
            return s.execute(select(projects.c.name).where(projects.c.name == name)).first() is not None


class ProjectCache:
    """Every project, read at once and kept ``ttl_s`` (the table is small: one row per team). A change
    made through this gateway is seen here at once (``invalidate``), on other replicas within ``ttl_s``."""

    def __init__(self, store: ProjectStore, ttl_s: float) -> None:
        self._store = store
        self._ttl = ttl_s
        self._projects: dict[str, Project] = {}
        self._expires = 0.0
        self._lock = asyncio.Lock()
        self._generation = 0

    async def access(self, project: str) -> ModelAccess:
        if time.monotonic() >= self._expires:
            await self._reload()
        return ModelAccess(self._projects.get(project), project)

    async def _reload(self) -> None:
        async with self._lock:
            if time.monotonic() < self._expires:
                return  # another request reloaded while this one waited
            generation = self._generation
            loaded = await asyncio.to_thread(self._store.list)
            if generation == self._generation:  # no invalidation raced with the read
                self._projects = {p.name: p for p in loaded}
                self._expires = time.monotonic() + self._ttl

    def invalidate(self) -> None:
        self._generation += 1
        self._expires = 0.0
