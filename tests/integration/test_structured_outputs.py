"""Structured outputs end to end with the real openai SDK: API → JetStream → worker → masked sampling. The tiny
random model writes garbage, so every valid answer here is the grammar's doing."""

from __future__ import annotations

import json
import re
from typing import Annotated, Literal

import openai
import pytest
from pydantic import BaseModel, Field

from tests.integration.test_batches import read_lines, start_batch, wait_final
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio


class Ticket(BaseModel):
    title: Annotated[str, Field(max_length=16)]
    priority: Literal["low", "high"]
    estimate: Annotated[int, Field(ge=0, le=99)]
    labels: Annotated[list[Annotated[str, Field(max_length=8)]], Field(max_length=2)]


def ticket_format() -> dict:
    schema = {**Ticket.model_json_schema(), "additionalProperties": False}
    return {"type": "json_schema", "json_schema": {"name": "ticket", "schema": schema, "strict": True}}


MESSAGES = [{"role": "user", "content": "File a ticket about the login page."}]


@pytest.fixture(scope="module")
def client(api) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0, timeout=120)


async def test_parse_into_a_pydantic_model_succeeds_for_every_seed(client) -> None:
    for seed in range(8):
        completion = await client.chat.completions.parse(
            model=TINY_MODEL_NAME, messages=MESSAGES, response_format=Ticket, temperature=1.0, seed=seed, max_tokens=300
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        assert isinstance(choice.message.parsed, Ticket)


async def test_streamed_json_schema_reassembles_into_a_valid_object(client) -> None:
    stream = await client.chat.completions.create(
        model=TINY_MODEL_NAME,
        messages=MESSAGES,
        stream=True,
        response_format=ticket_format(),
        temperature=1.0,
        seed=11,
        max_tokens=300,
    )
    pieces, finish = [], None
    async for chunk in stream:
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert finish == "stop" and len([p for p in pieces if p]) > 3  # really streamed, in pieces
    Ticket.model_validate_json("".join(pieces))


async def test_json_object_on_completions(client) -> None:
    completion = await client.completions.create(
        model=TINY_MODEL_NAME,
        prompt="JSON:",
        max_tokens=120,
        temperature=1.0,
        seed=5,
        extra_body={"response_format": {"type": "json_object"}},
    )
    choice = completion.choices[0]
    assert choice.text.lstrip().startswith("{")
    if choice.finish_reason == "stop":
        assert isinstance(json.loads(choice.text), dict)
    else:  # a cut output is still a prefix the grammar allowed: it never closed the object early
        assert choice.finish_reason == "length"


async def test_vllm_structured_outputs_regex_choice_and_grammar(client) -> None:
    regex = await client.completions.create(
        model=TINY_MODEL_NAME,
        prompt="Code:",
        max_tokens=30,
        temperature=1.0,
        extra_body={"structured_outputs": {"regex": r"[A-Z]{3}-[0-9]{4}"}},
    )
    assert re.fullmatch(r"[A-Z]{3}-[0-9]{4}", regex.choices[0].text) and regex.choices[0].finish_reason == "stop"
    choice = await client.chat.completions.create(
        model=TINY_MODEL_NAME,
        messages=MESSAGES,
        max_tokens=30,
        temperature=1.0,
        n=3,
        extra_body={"structured_outputs": {"choice": ["approve", "reject", "escalate"]}},
    )
    assert len(choice.choices) == 3
    assert all(c.message.content in {"approve", "reject", "escalate"} for c in choice.choices)
    grammar = await client.chat.completions.create(
        model=TINY_MODEL_NAME,
        messages=MESSAGES,
        max_tokens=40,
        temperature=1.0,
        seed=2,
        extra_body={"structured_outputs": {"grammar": 'root ::= "x=" [0-9] [0-9]? ("," [0-9])?'}},
    )
    assert re.fullmatch(r"x=[0-9][0-9]?(,[0-9])?", grammar.choices[0].message.content)


async def test_a_batch_line_with_response_format_is_enforced(client) -> None:
    body = {
        "model": TINY_MODEL_NAME,
        "messages": MESSAGES,
        "max_tokens": 300,
        "temperature": 1.0,
        "seed": 4,
        "response_format": ticket_format(),
    }
    batch = await start_batch(
        client,
        [{"custom_id": "t-1", "method": "POST", "url": "/v1/chat/completions", "body": body}],
        endpoint="/v1/chat/completions",
    )
    done = await wait_final(client, batch.id)
    [line] = await read_lines(client, done.output_file_id)
    Ticket.model_validate_json(line["response"]["body"]["choices"][0]["message"]["content"])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
            "response_format: the JSON schema is invalid",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {
                        "name": "x",
                        "strict": True,
                        "schema": {"type": "object", "unevaluatedProperties": False},
                    },
                }
            },
            "set strict to false",
        ),
        ({"structured_outputs": {"regex": "(unclosed"}}, "structured_outputs: the regex is invalid"),
        ({"structured_outputs": {"grammar": 'start: "a" start'}}, "can never finish"),
        ({"structured_outputs": {"grammar": 'root ::= "(" root ")"'}}, "can never finish"),  # GBNF
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "big", "schema": {"type": "object", "description": "y" * 70_000}},
                }
            },
            "over the limit of 65536",
        ),
        ({"guided_json": {"type": "object"}}, 'use structured_outputs: {"json"'),
        ({"response_format": {"type": "yaml"}}, "response_format"),
    ],
)
async def test_bad_constraints_are_a_400_naming_the_problem(client, extra, message) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model=TINY_MODEL_NAME, messages=MESSAGES, max_tokens=5, extra_body=extra)
    assert message in caught.value.body["message"], caught.value.body
    with pytest.raises(openai.BadRequestError) as caught:  # completions reads the same fields the same way
        await client.completions.create(model=TINY_MODEL_NAME, prompt="x", max_tokens=5, extra_body=extra)
    assert message in caught.value.body["message"], caught.value.body
