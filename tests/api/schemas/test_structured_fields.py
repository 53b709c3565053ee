"""`response_format` and `structured_outputs` read into the one wire constraint, with a message naming the field
when the shape is wrong (whether a schema compiles is tests/api/test_structured.py's business)."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.schemas.openai import ChatCompletionRequest, CompletionRequest
from contracts.constraints import (
    ChoiceConstraint,
    GrammarConstraint,
    JsonObjectConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
)

SCHEMA = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}


def chat(**fields):
    return ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], **fields)


def test_response_format_kinds() -> None:
    assert chat().constraint is None
    assert chat(response_format={"type": "text"}).constraint is None
    assert chat(response_format={"type": "json_object"}).constraint == JsonObjectConstraint()
    strict = chat(
        response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}}
    )
    assert strict.constraint == JsonSchemaConstraint(json_schema=SCHEMA, strict=True)
    assert strict.constraint_param == "response_format"
    lenient = CompletionRequest(
        model="m", prompt="p", response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA}}
    )
    assert lenient.constraint == JsonSchemaConstraint(json_schema=SCHEMA, strict=False)  # OpenAI's default


def test_structured_outputs_kinds() -> None:
    assert chat(structured_outputs={"json": SCHEMA}).constraint == JsonSchemaConstraint(
        json_schema=SCHEMA, strict=False
    )
    assert chat(structured_outputs={"json": '{"type": "object"}'}).constraint.json_schema == {"type": "object"}
    assert chat(structured_outputs={"regex": "a+"}).constraint == RegexConstraint(pattern="a+")
    assert chat(structured_outputs={"choice": ["x", "y"]}).constraint == ChoiceConstraint(choices=["x", "y"])
    assert chat(structured_outputs={"grammar": 'root ::= "a"'}).constraint == GrammarConstraint(grammar='root ::= "a"')
    body = chat(structured_outputs={"json_object": True})
    assert body.constraint == JsonObjectConstraint() and body.constraint_param == "structured_outputs"


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"response_format": {"type": "yaml"}}, "response_format: type: Input should be"),
        ({"response_format": {"type": "json_schema"}}, "type json_schema needs a json_schema object"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format: json_schema.schema",
        ),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one of json, regex, choice, grammar"),
        ({"structured_outputs": {}}, "exactly one of json, regex, choice, grammar"),
        ({"structured_outputs": {"json": "{not json"}}, "structured_outputs.json: not valid JSON"),
        ({"structured_outputs": {"choice": []}}, "structured_outputs: choices"),
        ({"structured_outputs": {"guided_json": {}}}, "structured_outputs: guided_json: Extra inputs"),
        ({"response_format": {"type": "json_object"}, "structured_outputs": {"regex": "a"}}, "send one"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"schema": {"x": "y" * 70_000}}}},
            "over the limit of 65536",
        ),
    ],
)
def test_bad_shapes_name_the_field(fields, message) -> None:
    with pytest.raises(ValidationError, match=message.replace(".", r"\.").replace("(", r"\(")):
        chat(**fields)
