"""`text.format` on /v1/responses with the official openai SDK: json_schema (strict) and json_object are
enforced by the engine as chat's `response_format` is (the tiny random model writes garbage, so every valid answer
is the grammar's doing), streamed and not, in the background too; a schema that cannot be enforced is a 400 in
OpenAI's shape before anything is queued."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.integration.test_responses_api import _wait_finished
from tests.integration.test_structured_outputs import Ticket
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio
PROMPT = "File a ticket about the login page."


def ticket_format() -> dict:
    schema = {**Ticket.model_json_schema(), "additionalProperties": False}
    return {"type": "json_schema", "name": "ticket", "schema": schema, "strict": True}


def _ticket(**fields) -> dict:
    return {
        "model": TINY_MODEL_NAME,
        "input": PROMPT,
        "text": {"format": ticket_format()},
        "temperature": 1.0,
        "max_output_tokens": 300,
        **fields,
    }


@pytest.fixture(scope="module")
def client(api) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


async def test_responses_parse_into_a_pydantic_model_for_every_seed(client) -> None:
    for _ in range(4):  # sampled, unseeded: four different answers
        response = await client.responses.parse(
            model=TINY_MODEL_NAME,
            input=PROMPT,
            text_format=Ticket,
            temperature=1.0,
            max_output_tokens=300,
        )
        assert response.status == "completed", response.output_text
        assert isinstance(response.output_parsed, Ticket)
        assert response.text.format.type == "json_schema" and response.text.format.strict is True


async def test_json_schema_streamed_reassembles_into_a_valid_object(client) -> None:
    stream = await client.responses.create(**_ticket(stream=True))
    events = [event async for event in stream]
    deltas = [event.delta for event in events if event.type == "response.output_text.delta"]
    assert events[-1].type == "response.completed" and len(deltas) > 3  # streamed in pieces
    Ticket.model_validate_json("".join(deltas))
    assert events[-1].response.output_text == "".join(deltas)


async def test_json_object_answers_an_object(client) -> None:
    response = await client.responses.create(
        model=TINY_MODEL_NAME,
        input="Describe a cat as JSON.",
        text={"format": {"type": "json_object"}},
        temperature=1.0,
        max_output_tokens=200,
    )
    assert response.output_text.lstrip().startswith("{")
    if response.status == "completed":
        assert isinstance(json.loads(response.output_text), dict)


async def test_a_background_response_keeps_its_format(client) -> None:
    """The constraint travels with the stored request, so whichever replica's runner runs it enforces it."""
    created = await client.responses.create(**_ticket(background=True))
    finished = await _wait_finished(client, created.id)
    assert finished.status == "completed", finished.output_text
    Ticket.model_validate_json(finished.output_text)
    assert finished.text.format.name == "ticket"


BAD_FORMATS = [
    ({"type": "json_schema", "name": "x", "schema": {"type": "strin"}}, "text.format: the JSON schema is invalid"),
    (
        {"type": "json_schema", "name": "x", "strict": True, "schema": {"type": "object", "unevaluatedProperties": 0}},
        "set strict to false",
    ),
    ({"type": "json_schema", "name": "x"}, "text.format.schema"),
    ({"type": "yaml"}, "text.format.type"),
    ({"type": "json_object", "schema": {}}, "text.format.schema"),
]


@pytest.mark.parametrize(("text_format", "words"), BAD_FORMATS, ids=[words for _, words in BAD_FORMATS])
async def test_a_bad_format_is_a_400_in_the_openai_shape(api, text_format, words) -> None:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as http:
        answer = await http.post(
            "/v1/responses", json={"model": TINY_MODEL_NAME, "input": "hi", "text": {"format": text_format}}
        )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert words in error["message"] and error["type"] == "invalid_request_error", error
