"""Manifest JSON round trip and validation (no S3 involved)."""

from __future__ import annotations

import hashlib
import json

import pytest

from services.core.artifacts import FileEntry, Manifest, key_problem
from services.core.errors import InvalidArgument


def _entry(path: str, data: bytes) -> FileEntry:
    return FileEntry(path, len(data), hashlib.sha256(data).hexdigest())


def _manifest() -> Manifest:
    return Manifest([_entry("config.json", b"{}"), _entry("weights/model-00001.safetensors", b"x" * 100),
                     _entry("empty.txt", b"")])


def test_manifest_json_round_trip_keeps_every_entry_in_order():
    m = _manifest()
    back = Manifest.from_json(m.to_json())
    assert back == m
    assert back.files[1] == FileEntry("weights/model-00001.safetensors", 100, hashlib.sha256(b"x" * 100).hexdigest())
    assert Manifest.from_json(m.to_json().encode()) == m


def test_manifest_total_size_and_find():
    m = _manifest()
    assert m.total_size == 102
    assert json.loads(m.to_json())["total_size"] == 102
    assert m.find("config.json") == _entry("config.json", b"{}")
    assert m.find("missing.bin") is None
    assert Manifest([]).total_size == 0


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ("not json", "manifest"),
        ([], "manifest"),
        ({"version": 2, "files": []}, "manifest.version"),
        ({"files": {}}, "manifest.files"),
        ({"files": [{"path": "a", "size": -1, "sha256": "0" * 64}]}, "manifest.files[0].size"),
        ({"files": [{"path": "a", "size": 1, "sha256": "XYZ"}]}, "manifest.files[0].sha256"),
        ({"files": [{"path": "../etc/passwd", "size": 1, "sha256": "0" * 64}]}, "manifest.files[0].path"),
        ({"files": [{"path": "/abs", "size": 1, "sha256": "0" * 64}]}, "manifest.files[0].path"),
        ({"files": [{"path": "a", "size": 1, "sha256": "0" * 64},
                    {"path": "a", "size": 1, "sha256": "0" * 64}]}, "manifest.files[1].path"),
        ({"files": [{"path": "a", "size": 1, "sha256": "0" * 64}], "total_size": 5}, "manifest.total_size"),
    ],
)
def test_invalid_manifest_is_rejected_naming_the_field(doc, field):
    text = doc if isinstance(doc, str) else json.dumps(doc)
    with pytest.raises(InvalidArgument) as err:
        Manifest.from_json(text)
    assert err.value.violations[0].field == field


@pytest.mark.parametrize("key", ["", "/a", "a//b", "a/", "a/../b", "./a", "a\\b", "a\x00b", ".nanio/x"])
def test_key_problem_flags_unsafe_keys(key):
    assert key_problem(key) is not None


@pytest.mark.parametrize("key", ["a", "models/m1/versions/3/files/weights/model.safetensors", "x.y-z_1"])
def test_key_problem_accepts_normal_keys(key):
    assert key_problem(key) is None
