"""Local paths a service reads on a caller's behalf (registry model imports, pipeline dataset files).

A path is read only when it lies under one of the service's allowed roots, after ``realpath`` (symbolic links
along the way resolved, ``..`` gone); ``~`` is never expanded and a relative path is refused. A path that does
not exist, lies outside the roots, or cannot be read gets one and the same error (code, reason and message
template; only the path the caller gave differs), so a caller cannot probe the service's filesystem. A folder
must hold no symbolic link (file or folder, at any depth) whose target leaves the folder.

Roots: the configured list when it is not empty. An empty list on a service listening on loopback means the
single-machine defaults (the home folder, the system temp folder, the service's working folder and the Python
site-packages folders); on a non-loopback address it means local paths are disabled.
"""

from __future__ import annotations

import ipaddress
import json
import os
import site
import stat
import sysconfig
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import NoDecode

from .errors import FailedPrecondition, InvalidArgument

NOT_ALLOWED = "SOURCE_NOT_ALLOWED"
DISABLED = "LOCAL_SOURCES_DISABLED"
NOT_ABSOLUTE = "SOURCE_PATH_NOT_ABSOLUTE"
SYMLINK_OUTSIDE = "SOURCE_SYMLINK_OUTSIDE"
TOO_MANY_ENTRIES = "SOURCE_TOO_MANY_FILES"
# A folder with more entries than this is refused before it is walked to the end (a model folder has dozens).
MAX_FOLDER_ENTRIES = 100_000


def split_list(value: object) -> object:
    """A list setting from the environment: "a,b" or a JSON list."""
    if isinstance(value, str):
        value = value.strip()
        if value.startswith("["):
            return json.loads(value)
        return [item.strip() for item in value.split(",") if item.strip()]
    return value


class LocalSourceSettings(BaseModel):
    """The ``imports`` settings of a service that reads local paths for its callers."""

    # Folders local paths may lie under, absolute (resolved with realpath). Empty: on a loopback listen address
    # the single-machine defaults (home, the system temp folder, the working folder, site-packages); on any
    # other address local paths are refused.
    allowed_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        return split_list(value)

    @field_validator("allowed_roots")
    @classmethod
    def _absolute(cls, roots: list[Path]) -> list[Path]:
        for root in roots:
            if not root.is_absolute():
                raise ValueError(f"{str(root)!r} must be an absolute path ('~' is not expanded)")
        return roots


def is_loopback(host: str) -> bool:
    """Whether a listen address only accepts connections from this machine (``0.0.0.0`` / ``::`` do not)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def default_roots() -> list[str]:
    """The single-machine defaults: home, the system temp folder, the working folder, site-packages."""
    candidates: list[str] = [str(Path.home()), tempfile.gettempdir(), os.getcwd()]
    candidates += site.getsitepackages()
    candidates.append(site.getusersitepackages())
    candidates += [p for key in ("purelib", "platlib") if (p := sysconfig.get_paths().get(key))]
    return _unique(os.path.realpath(p) for p in candidates if os.path.isdir(p))


def _unique(paths: Iterable[str]) -> list[str]:
    out: list[str] = []
    for p in paths:
        if p not in out:
            out.append(p)
    return out


def within(path: str, root: str) -> bool:
    """Whether the real path ``path`` is ``root`` or below it (both already through ``realpath``)."""
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


@dataclass(frozen=True)
class LocalPathPolicy:
    """The effective roots of one service (real paths; empty: local paths disabled) and the setting that
    configures them (named in errors)."""

    roots: tuple[str, ...]
    setting: str

    @classmethod
    def effective(cls, configured: Sequence[str | Path], host: str, setting: str) -> LocalPathPolicy:
        """The configured roots; none configured: the defaults on loopback, nothing (disabled) otherwise."""
        if configured:
            roots = _unique(os.path.realpath(str(p)) for p in configured)
        elif is_loopback(host):
            roots = default_roots()
        else:
            roots = []
        return cls(tuple(roots), setting)

    def to_dict(self) -> dict[str, object]:
        return {"roots": list(self.roots), "setting": self.setting}

    @classmethod
    def from_dict(cls, doc: dict) -> LocalPathPolicy:
        return cls(tuple(str(r) for r in doc.get("roots", [])), str(doc.get("setting", "")))

    # ------------------------------------------------------------------ checks

    def resolve(self, path: str, *, field: str, what: str, given: str | None = None) -> tuple[Path, os.stat_result]:
        """The real path of ``path`` and its stat, when it is an existing, readable regular file or folder under
        the roots; otherwise the one not-allowed error. ``what`` says what the field must name and ``given`` is
        the value as the caller wrote it (default ``path``): errors name only that."""
        given = path if given is None else given
        if not self.roots:
            raise FailedPrecondition(
                f"{field}: local paths are disabled on this service: it listens on a non-loopback address and "
                f"{self.setting} is empty; set it to the folders callers may read from",
                reason=DISABLED,
                metadata={"setting": self.setting},
            )
        if not os.path.isabs(path):
            raise InvalidArgument.for_field(
                field, f"{given!r} must be an absolute path (the service expands no '~' and resolves no relative path)",
                reason=NOT_ABSOLUTE,
            )  # fmt: skip
        real = os.path.realpath(path)
        if not any(within(real, root) for root in self.roots):
            raise self.not_allowed(given, field=field, what=what)
        try:
            st = os.stat(real)
            if stat.S_ISDIR(st.st_mode):
                with os.scandir(real) as entries:
                    next(entries, None)
            elif stat.S_ISREG(st.st_mode):
                with open(real, "rb"):
                    pass
            else:  # a device, a FIFO, a socket: never read
                raise self.not_allowed(given, field=field, what=what)
        except OSError:
            raise self.not_allowed(given, field=field, what=what) from None
        return Path(real), st

    def not_allowed(self, given: str, *, field: str, what: str) -> InvalidArgument:
        return InvalidArgument.for_field(
            field, f"{given!r} is not an allowed local path: it must name {what} that exists, is readable and lies "
            f"under the service's allowed roots ({self.setting})",
            reason=NOT_ALLOWED, metadata={"path": given},
        )  # fmt: skip


def check_folder_links(folder: Path, *, field: str, given: str, max_entries: int = MAX_FOLDER_ENTRIES) -> None:
    """Refuse a folder holding a symbolic link (to a file or a folder, at any depth, hidden ones included)
    whose target leaves the folder, naming the link by its path relative to the folder."""
    root = os.path.realpath(folder)
    seen = 0
    for dirpath, dirnames, filenames in os.walk(root):  # symlinked folders are listed, never entered
        for name in dirnames + filenames:
            seen += 1
            if seen > max_entries:
                raise InvalidArgument.for_field(
                    field, f"{given!r} holds more than {max_entries} files and folders; import a model folder",
                    reason=TOO_MANY_ENTRIES,
                )  # fmt: skip
            path = os.path.join(dirpath, name)
            if os.path.islink(path) and not within(os.path.realpath(path), root):
                rel = os.path.relpath(path, root)
                raise InvalidArgument.for_field(
                    field, f"{given!r}: {rel} is a symbolic link whose target is outside the folder; copy the "
                    f"file into the folder instead",
                    reason=SYMLINK_OUTSIDE, metadata={"path": rel},
                )  # fmt: skip
