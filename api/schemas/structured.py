"""The request fields that ask for structured output, read into one wire constraint (contracts/constraints.py):
OpenAI `response_format` and vLLM's `structured_outputs`. Shapes only; whether the schema/regex/grammar compiles is
checked later by api/structured.py, before queueing."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contracts.constraints import Constraint, parse_constraint

# The vLLM fields removed in favour of `structured_outputs` (vLLM 0.11): field -> what to send instead.
DEPRECATED_GUIDED = {
    "guided_json": 'structured_outputs: {"json": <schema>}',
    "guided_regex": 'structured_outputs: {"regex": <pattern>}',
    "guided_choice": 'structured_outputs: {"choice": [<strings>]}',
    "guided_grammar": 'structured_outputs: {"grammar": <grammar>}',
}


class JsonSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str | None = Field(default=None, max_length=64)
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None  # OpenAI's default is false: unsupported keywords are then ignored, not refused


class ResponseFormat(BaseModel):
    """OpenAI `response_format`."""

    model_config = ConfigDict(extra="forbid")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    def constraint(self) -> dict[str, Any] | None:
        if self.type == "text":
            return None
        if self.type == "json_object":
            return {"type": "json_object"}
        if self.json_schema is None:
            raise ValueError("response_format: type json_schema needs a json_schema object with a schema")
        return {"type": "json_schema", "json_schema": self.json_schema.schema_, "strict": bool(self.json_schema.strict)}


class StructuredOutputs(BaseModel):
    """vLLM `structured_outputs`: exactly one of json, regex, choice, grammar (json_object as in vLLM)."""

    model_config = ConfigDict(extra="forbid")

    json_: dict[str, Any] | str | None = Field(default=None, alias="json")
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None

    def constraint(self) -> dict[str, Any]:
        given = [
            name
            for name in ("json", "regex", "choice", "grammar", "json_object")
            if getattr(self, "json_" if name == "json" else name) not in (None, False)
        ]
        if len(given) != 1:
            raise ValueError(
                f"structured_outputs: give exactly one of json, regex, choice, grammar (got "
                f"{', '.join(given) or 'none'})"
            )
        if self.json_ is not None:
            schema = self.json_
            if isinstance(schema, str):
                try:
                    schema = json.loads(schema)
                except ValueError as exc:
                    raise ValueError(f"structured_outputs.json: not valid JSON: {exc}") from exc
            if not isinstance(schema, dict):
                raise ValueError("structured_outputs.json: a JSON schema must be an object")
            return {"type": "json_schema", "json_schema": schema, "strict": False}  # vLLM ignores what it cannot
        if self.regex is not None:
            return {"type": "regex", "pattern": self.regex}
        if self.choice is not None:
            return {"type": "choice", "choices": self.choice}
        if self.grammar is not None:
            return {"type": "grammar", "grammar": self.grammar}
        return {"type": "json_object"}


def _readable(exc: ValidationError, skip: int = 0) -> str:
    """The first error as `where: what`; `skip` drops leading location parts (a union's tag)."""
    error = exc.errors()[0]
    where = ".".join(str(part) for part in error["loc"][skip:])
    return f"{where}: {error['msg']}" if where else error["msg"]


def requested_constraint(response_format: Any, structured_outputs: Any) -> Constraint | None:
    """The one constraint the two fields ask for (None: free text). Raises ValueError with the field's name."""
    wanted: dict[str, Any] | None = None
    where = ""
    try:
        if response_format is not None:
            where = "response_format"
            wanted = ResponseFormat.model_validate(response_format).constraint()
        if structured_outputs is not None:
            if wanted is not None:
                raise ValueError("response_format and structured_outputs both constrain the output; send one")
            where = "structured_outputs"
            wanted = StructuredOutputs.model_validate(structured_outputs).constraint()
    except ValidationError as exc:
        raise ValueError(f"{where}: {_readable(exc)}") from None
    if wanted is None:
        return None
    try:
        return parse_constraint(wanted)
    except ValidationError as exc:
        raise ValueError(f"{where}: {_readable(exc, skip=1)}") from None
