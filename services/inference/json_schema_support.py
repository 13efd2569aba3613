"""Which JSON-schema keywords structured output enforces, checked before a request reaches an engine.

Both engines constrain decoding with xgrammar (the transformers engine through
``engines/constrained.py``, vLLM through its default structured-output backend), and xgrammar
accepts some keywords without enforcing them: an answer could then break the schema the client
asked for. ``check_schema`` refuses those with INVALID_ARGUMENT naming the keyword and where it is
(``response_format.json_schema.schema.properties.tags.uniqueItems``), so a client learns it at once.

Enforced (checked against xgrammar 0.2.8): type, properties, required, additionalProperties,
patternProperties, propertyNames, unevaluatedProperties/Items, min/maxProperties, items, prefixItems,
min/maxItems, enum, const, anyOf, oneOf (as anyOf: exclusivity is not checked), allOf with one
entry, local ``$ref`` (``#/$defs/...``, ``#/definitions/...``, ``#/properties/...``), pattern,
format, min/maxLength, minimum/maximum/exclusive*, multipleOf. Annotations (title, description,
default, examples, ...) are ignored, as JSON Schema allows.
"""

from __future__ import annotations

from typing import Any

from services.core.errors import InvalidArgument

# keyword -> why it is refused
UNSUPPORTED: dict[str, str] = {
    "not": "negation cannot be enforced while decoding",
    "if": "conditional schemas (if/then/else) are not enforced",
    "then": "conditional schemas (if/then/else) are not enforced",
    "else": "conditional schemas (if/then/else) are not enforced",
    "dependentSchemas": "it is not enforced",
    "dependentRequired": "it is not enforced",
    "dependencies": "it is not enforced",
    "contains": "it is not enforced",
    "minContains": "it is not enforced",
    "maxContains": "it is not enforced",
    "$dynamicRef": "dynamic references are not resolved",
    "$recursiveRef": "recursive references of draft 2019-09 are not resolved; use $ref to #/$defs/...",
    "additionalItems": "draft-7 tuple arrays are not supported; use prefixItems and items",
}

# keywords whose value is a schema / a map of schemas / a list of schemas
_SCHEMA = (
    "additionalProperties",
    "unevaluatedProperties",
    "unevaluatedItems",
    "propertyNames",
    "not",
    "if",
    "then",
    "else",
    "contains",
    "additionalItems",
)
_SCHEMA_MAP = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_LIST = ("anyOf", "oneOf", "allOf", "prefixItems")


def check_schema(schema: Any, field: str) -> None:
    """Raise InvalidArgument for the first keyword of ``schema`` that structured output cannot enforce."""
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise InvalidArgument.for_field(field, f"a JSON schema must be an object or a boolean, got {_kind(schema)}")
    _check(schema, field)


def _check(schema: Any, where: str) -> None:
    if isinstance(schema, bool):
        return
    if not isinstance(schema, dict):
        raise InvalidArgument.for_field(where, f"a JSON schema must be an object or a boolean, got {_kind(schema)}")
    for key, value in schema.items():
        at = f"{where}.{key}"
        if key in UNSUPPORTED:
            raise InvalidArgument.for_field(at, f"{key} is not supported in structured output: {UNSUPPORTED[key]}")
        if key == "uniqueItems" and value is True:
            raise InvalidArgument.for_field(at, "uniqueItems is not supported in structured output: it is not enforced")
        if key == "allOf" and isinstance(value, list) and len(value) > 1:
            raise InvalidArgument.for_field(
                at, "allOf with more than one schema is not supported in structured output: merge them into one schema"
            )
        if key == "$ref" and not (isinstance(value, str) and value.startswith("#")):
            raise InvalidArgument.for_field(
                at,
                f"$ref {value!r} is not supported in structured output: only "
                "references inside the schema (#/$defs/...) are resolved",
            )
        if key == "items" and isinstance(value, list):
            raise InvalidArgument.for_field(
                at, "items as a list (draft-7 tuples) is not supported in structured output: use prefixItems"
            )
        if key == "type" and not _valid_type(value):
            raise InvalidArgument.for_field(at, f"unknown type {value!r}")
        if key in _SCHEMA or key == "items":
            _check(value, at)
        elif key in _SCHEMA_MAP:
            if not isinstance(value, dict):
                raise InvalidArgument.for_field(at, f"must be an object of schemas, got {_kind(value)}")
            for name, sub in value.items():
                _check(sub, f"{at}.{name}")
        elif key in _SCHEMA_LIST:
            if not isinstance(value, list) or not value:
                raise InvalidArgument.for_field(at, "must be a non-empty list of schemas")
            for i, sub in enumerate(value):
                _check(sub, f"{at}[{i}]")


_TYPES = {"object", "array", "string", "number", "integer", "boolean", "null"}


def _valid_type(value: Any) -> bool:
    if isinstance(value, str):
        return value in _TYPES
    return isinstance(value, list) and bool(value) and all(isinstance(v, str) and v in _TYPES for v in value)


def _kind(value: Any) -> str:
    return {
        dict: "an object",
        list: "a list",
        str: "a string",
        int: "a number",
        float: "a number",
        type(None): "null",
    }.get(type(value), type(value).__name__)
