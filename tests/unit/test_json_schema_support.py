"""Schema keywords structured output cannot enforce are refused, naming them and where they are."""

from __future__ import annotations

import json

import pytest
import xgrammar as xgr
from xgrammar.testing import _is_grammar_accept_string

from services.core.errors import InvalidArgument
from services.inference.json_schema_support import check_schema

ROOT = "response_format.json_schema.schema"


@pytest.mark.parametrize(
    ("schema", "where", "keyword"),
    [
        ({"not": {"type": "string"}}, "not", "not"),
        ({"type": "object", "properties": {"a": {"type": "integer"}}, "if": {}, "then": {}}, "if", "if"),
        ({"type": "object", "dependentRequired": {"a": ["b"]}}, "dependentRequired", "dependentRequired"),
        ({"type": "object", "dependentSchemas": {"a": {}}}, "dependentSchemas", "dependentSchemas"),
        (
            {"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}},
            "properties.tags.uniqueItems",
            "uniqueItems",
        ),
        ({"type": "array", "contains": {"type": "integer"}}, "contains", "contains"),
        ({"$ref": "https://example.com/schema.json"}, "$ref", "$ref"),
        (
            {"$defs": {"a": {"type": "object", "properties": {"b": {"not": {}}}}}, "$ref": "#/$defs/a"},
            "$defs.a.properties.b.not",
            "not",
        ),
        ({"anyOf": [{"type": "string"}, {"type": "array", "items": {"not": {}}}]}, "anyOf[1].items.not", "not"),
        ({"allOf": [{"type": "object"}, {"required": ["a"]}]}, "allOf", "allOf"),
        ({"type": "array", "items": [{"type": "integer"}]}, "items", "items"),
        ({"type": "strng"}, "type", "strng"),
    ],
)
def test_unsupported_keyword_is_named_with_its_path(schema, where, keyword):
    with pytest.raises(InvalidArgument) as err:
        check_schema(schema, ROOT)
    assert err.value.violations[0].field == f"{ROOT}.{where}"
    assert keyword in str(err.value)


@pytest.mark.parametrize(
    "schema",
    [
        {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 20, "pattern": "^[A-Z]"},
                "t": {"type": "integer", "minimum": -50},
            },
            "required": ["city"],
            "additionalProperties": False,
        },
        {
            "$defs": {
                "node": {"type": "object", "properties": {"kids": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}
            },
            "$ref": "#/$defs/node",
        },
        {"anyOf": [{"type": "string", "format": "date"}, {"type": "null"}]},
        {"oneOf": [{"type": "integer"}, {"type": "string"}]},
        {"allOf": [{"$ref": "#/definitions/a"}], "definitions": {"a": {"type": "integer"}}},
        {"type": "array", "prefixItems": [{"type": "integer"}], "items": False, "minItems": 1, "uniqueItems": False},
        {"type": ["string", "null"], "title": "T", "description": "d", "examples": ["x"], "default": None},
        True,
    ],
)
def test_supported_schemas_pass(schema):
    check_schema(schema, ROOT)


def test_a_schema_must_be_an_object():
    with pytest.raises(InvalidArgument) as err:
        check_schema([{"type": "string"}], ROOT)
    assert err.value.violations[0].field == ROOT


@pytest.mark.parametrize(
    ("schema", "breaking"),
    [
        ({"type": "array", "items": {"type": "integer"}, "uniqueItems": True}, [1, 1]),
        ({"not": {"type": "string"}}, "x"),
        (
            {
                "type": "object",
                "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                "dependentRequired": {"a": ["b"]},
            },
            {"a": 1},
        ),
        ({"type": "array", "items": {"type": ["integer", "string"]}, "contains": {"type": "integer"}}, ["a"]),
    ],
)
def test_refused_keywords_are_the_ones_xgrammar_does_not_enforce(schema, breaking):
    """Why each is refused: xgrammar's grammar for the schema accepts an instance that breaks it."""
    grammar = xgr.Grammar.from_json_schema(json.dumps(schema), any_whitespace=False)
    assert _is_grammar_accept_string(grammar, json.dumps(breaking))
    with pytest.raises(InvalidArgument):
        check_schema(schema, ROOT)
