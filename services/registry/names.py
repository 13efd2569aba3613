"""Resource names of the registry: parsing and validation (errors name the field)."""

from __future__ import annotations

import re
from dataclasses import dataclass

from services.core.errors import InvalidArgument

ID_PATTERN = r"[a-z0-9](?:[a-z0-9._-]{0,61}[a-z0-9])?"
_ID_RE = re.compile(rf"^{ID_PATTERN}$")
_ID_RULE = "must be 1-63 characters of lowercase letters, digits, '-', '.', '_', starting and ending with a letter or digit"


def check_id(value: str, field: str) -> str:
    """``value`` if it is a valid resource id, else InvalidArgument naming ``field``."""
    if not _ID_RE.match(value or ""):
        raise InvalidArgument.for_field(field, f"{value!r} {_ID_RULE}", reason="INVALID_NAME")
    return value


@dataclass(frozen=True)
class VersionName:
    """``{collection}/{parent_id}/versions/{version}`` (collection: models or datasets)."""

    collection: str
    parent_id: str
    version: str

    @property
    def parent(self) -> str:
        return f"{self.collection}/{self.parent_id}"

    def __str__(self) -> str:
        return f"{self.collection}/{self.parent_id}/versions/{self.version}"


def parse_parent(name: str, collection: str, field: str = "name", *, allow_wildcard: bool = False) -> str:
    """The id of ``{collection}/{id}``; ``-`` (every parent) only when ``allow_wildcard``."""
    parts = (name or "").split("/")
    if len(parts) != 2 or parts[0] != collection:
        raise InvalidArgument.for_field(field, f"{name!r} is not of the form {collection}/{{id}}", reason="INVALID_NAME")
    if allow_wildcard and parts[1] == "-":
        return "-"
    return check_id(parts[1], field)


def parse_version(name: str, collection: str, field: str = "name") -> VersionName:
    """Parse ``{collection}/{id}/versions/{version}``."""
    parts = (name or "").split("/")
    if len(parts) != 4 or parts[0] != collection or parts[2] != "versions":
        raise InvalidArgument.for_field(
            field, f"{name!r} is not of the form {collection}/{{id}}/versions/{{version}}", reason="INVALID_NAME"
        )
    return VersionName(collection, check_id(parts[1], field), check_id(parts[3], field))


def parse_any_version(name: str, field: str = "name") -> VersionName:
    """A model or dataset version name."""
    collection = (name or "").split("/", 1)[0]
    if collection not in ("models", "datasets"):
        raise InvalidArgument.for_field(
            field, f"{name!r} is neither models/{{m}}/versions/{{v}} nor datasets/{{d}}/versions/{{v}}",
            reason="INVALID_NAME",
        )
    return parse_version(name, collection, field)


def parse_import(name: str, field: str = "name") -> str:
    parts = (name or "").split("/")
    if len(parts) != 2 or parts[0] != "imports" or not re.fullmatch(r"[0-9a-f]{32}", parts[1]):
        raise InvalidArgument.for_field(field, f"{name!r} is not of the form imports/{{id}}", reason="INVALID_NAME")
    return parts[1]
