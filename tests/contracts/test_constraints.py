"""Wire constraints: the discriminated union, size bounds, and a cache key that keeps property order."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from contracts.constraints import (
    MAX_CHOICES,
    MAX_SCHEMA_BYTES,
    ChoiceConstraint,
    GrammarConstraint,
    JsonObjectConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
    constraint_key,
    parse_constraint,
)


@pytest.mark.parametrize(
    "constraint",
    [
        JsonSchemaConstraint(json_schema={"type": "object", "properties": {"a": {"type": "integer"}}}, strict=False),
        JsonObjectConstraint(),
        RegexConstraint(pattern=r"\d{3}"),
        ChoiceConstraint(choices=["yes", "no"]),
        GrammarConstraint(grammar='start: "a"+'),
    ],
)
def test_each_kind_round_trips_through_json_by_its_type(constraint) -> None:
    parsed = parse_constraint(constraint.to_bytes())
    assert parsed == constraint and type(parsed) is type(constraint)
    assert parse_constraint(json.loads(constraint.to_bytes())) == constraint


@pytest.mark.parametrize(
    "data",
    [
        {"type": "json_schema"},  # no schema
        {"type": "regex", "pattern": ""},
        {"type": "choice", "choices": []},
        {"type": "choice", "choices": [""]},
        {"type": "choice", "choices": ["x"] * (MAX_CHOICES + 1)},
        {"type": "grammar", "grammar": "x" * (64 * 1024 + 1)},
        {"type": "regex", "pattern": "a" * 5000},
        {"type": "ebnf", "grammar": "x"},  # unknown kind
        {"type": "regex", "pattern": "a", "flags": "i"},  # unknown field
        {"type": "json_schema", "json_schema": {"enum": ["x" * MAX_SCHEMA_BYTES]}},
    ],
)
def test_malformed_or_oversized_constraints_are_refused(data: dict) -> None:
    with pytest.raises(ValidationError):
        parse_constraint(data)


def test_strict_is_the_default_for_schemas() -> None:
    assert parse_constraint({"type": "json_schema", "json_schema": {"type": "string"}}).strict is True


def test_the_key_identifies_content_and_keeps_property_order() -> None:
    ab = {"type": "object", "properties": {"a": {}, "b": {}}}
    ba = {"type": "object", "properties": {"b": {}, "a": {}}}
    assert constraint_key(JsonSchemaConstraint(json_schema=ab)) == constraint_key(
        parse_constraint(JsonSchemaConstraint(json_schema=ab).to_bytes())
    )
    assert constraint_key(JsonSchemaConstraint(json_schema=ab)) != constraint_key(JsonSchemaConstraint(json_schema=ba))
    assert constraint_key(JsonSchemaConstraint(json_schema=ab)) != constraint_key(
        JsonSchemaConstraint(json_schema=ab, strict=False)
    )
    assert constraint_key(RegexConstraint(pattern="a")) != constraint_key(ChoiceConstraint(choices=["a"]))
