"""Constraints on what a generation may produce (structured outputs): a JSON Schema, any JSON object, a regular
expression, a choice among strings, or a Lark/GBNF grammar. Data only; the edge validates one before queueing
(api/structured.py) and a worker compiles it to a token mask (engine_worker/constraints.py).

`GenerateRequest.constraint` carries one (issue #16), so these models are part of the published NATS schema.

Sizes are bounded here, on the wire, so neither the edge nor a worker ever compiles an unbounded grammar.
"""

from __future__ import annotations

import hashlib
import json
from typing import Annotated, Any, Literal

from pydantic import Field, TypeAdapter, field_validator

from contracts.base import Contract

MAX_SCHEMA_BYTES = 64 * 1024  # a JSON Schema, serialized (OpenAI's own limits are far below this)
MAX_PATTERN_CHARS = 4096
MAX_GRAMMAR_CHARS = 64 * 1024
MAX_CHOICES = 1024
MAX_CHOICE_CHARS = 1024


class JsonSchemaConstraint(Contract):
    """Output is one JSON value valid against `json_schema` (properties in the schema's order).

    strict=True (OpenAI `strict: true`): a schema keyword the engine cannot enforce is an error. strict=False: such
    keywords are ignored (the output still follows everything else)."""

    type: Literal["json_schema"] = "json_schema"
    json_schema: dict[str, Any]
    strict: bool = True

    @field_validator("json_schema")
    @classmethod
    def _bounded(cls, value: dict[str, Any]) -> dict[str, Any]:
        size = len(json.dumps(value, separators=(",", ":")).encode())
        if size > MAX_SCHEMA_BYTES:
            raise ValueError(f"the JSON schema is {size} bytes, over the limit of {MAX_SCHEMA_BYTES}")
        return value


class JsonObjectConstraint(Contract):
    """Output is one JSON object, any keys (OpenAI `response_format: {"type": "json_object"}`)."""

    type: Literal["json_object"] = "json_object"


class RegexConstraint(Contract):
    """Output matches the regular expression as a whole (Rust `regex` syntax: no look-around, no back-references)."""

    type: Literal["regex"] = "regex"
    pattern: str = Field(min_length=1, max_length=MAX_PATTERN_CHARS)


class ChoiceConstraint(Contract):
    """Output is exactly one of the strings."""

    type: Literal["choice"] = "choice"
    choices: list[Annotated[str, Field(min_length=1, max_length=MAX_CHOICE_CHARS)]] = Field(
        min_length=1, max_length=MAX_CHOICES
    )


class GrammarConstraint(Contract):
    """Output is a sentence of the grammar: Lark syntax (llguidance's dialect, start rule `start`) or GBNF
    (llama.cpp, start rule `root`). The text is read as Lark when a line begins with `start:` or `%llguidance`,
    else as GBNF (llguidance's rule, as behind vLLM's `grammar` field)."""

    type: Literal["grammar"] = "grammar"
    grammar: str = Field(min_length=1, max_length=MAX_GRAMMAR_CHARS)


Constraint = Annotated[
    JsonSchemaConstraint | JsonObjectConstraint | RegexConstraint | ChoiceConstraint | GrammarConstraint,
    Field(discriminator="type"),
]
_constraint_adapter: TypeAdapter[Constraint] = TypeAdapter(Constraint)
CONSTRAINT_TYPES: tuple[str, ...] = tuple(
    model.model_fields["type"].default
    for model in (JsonSchemaConstraint, JsonObjectConstraint, RegexConstraint, ChoiceConstraint, GrammarConstraint)
)


def parse_constraint(data: bytes | str | dict[str, Any]) -> Constraint:
    if isinstance(data, dict):
        return _constraint_adapter.validate_python(data)
    return _constraint_adapter.validate_json(data)


def constraint_key(constraint: Constraint) -> str:
    """A digest that identifies what the constraint allows. Key order is kept, not sorted: the order of a schema's
    `properties` is the order the output must follow, so two schemas that differ only in it are different."""
    return hashlib.sha256(constraint.model_dump_json().encode()).hexdigest()
