"""The Responses API (/v1/responses) through the official openai SDK against the real path (API → NATS →
worker on the tiny model): create, stream, store/retrieve/delete/input_items, previous_response_id,
background with poll, cancel and stream resume, and the bad input that must be a clear 400."""

from __future__ import annotations

import asyncio
import time

import httpx
import openai
import pytest
from openai.types.responses import Response, ResponseStreamEvent
from pydantic import TypeAdapter

from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio
EVENTS = TypeAdapter(ResponseStreamEvent)


@pytest.fixture(scope="module")
def client(api) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0)


def _create(**fields) -> dict:
    return {"model": TINY_MODEL_NAME, "temperature": 0, "max_output_tokens": 8, **fields}


async def _wait_finished(client: openai.AsyncOpenAI, response_id: str, timeout_s: float = 60) -> Response:
    deadline = time.monotonic() + timeout_s
    while True:
        response = await client.responses.retrieve(response_id)
        if response.status not in ("queued", "in_progress") or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.2)


async def test_create_returns_a_response_the_sdk_parses_and_stores_it(client) -> None:
    response = await client.responses.create(
        **_create(input="Say hello", instructions="Be brief.", metadata={"case": "plain"})
    )
    assert isinstance(response, Response) and response.id.startswith("resp_") and response.object == "response"
    [message] = response.output
    assert message.type == "message" and message.role == "assistant" and message.content[0].type == "output_text"
    assert response.output_text and message.content[0].annotations == []
    usage = response.usage
    assert usage.input_tokens > 0 and 0 < usage.output_tokens <= 8
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert response.metadata == {"case": "plain"} and response.instructions == "Be brief."
    if response.status == "incomplete":  # ran into max_output_tokens
        assert usage.output_tokens == 8 and response.incomplete_details.reason == "max_output_tokens"
    stored = await client.responses.retrieve(response.id)
    assert stored.model_dump() == response.model_dump()
    items = await client.responses.input_items.list(response.id)
    [item] = items.data
    assert item.role == "user" and item.content[0].text == "Say hello"


async def test_max_output_tokens_makes_it_incomplete(client) -> None:
    response = await client.responses.create(
        **_create(input="Count to one hundred", max_output_tokens=3, extra_body={})
    )
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    assert response.usage.output_tokens == 3


async def test_store_false_is_not_retrievable(client) -> None:
    response = await client.responses.create(**_create(input="Hello", store=False))
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)


async def test_stream_sends_the_named_events_in_order(client, api) -> None:
    stream = await client.responses.create(**_create(input="Say hello"), stream=True)
    events = [event async for event in stream]
    kinds = [event.type for event in events]
    assert kinds[:5] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
    ]
    assert kinds[-4:-1] == ["response.output_text.done", "response.content_part.done", "response.output_item.done"]
    assert kinds[-1] in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))
    text = "".join(event.delta for event in events if event.type == "response.output_text.delta")
    final = events[-1].response
    assert final.output_text == text and events[-2].item.content[0].text == text
    assert (await client.responses.retrieve(final.id)).output_text == text
    # The wire frames carry OpenAI's `event:` names too.
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        raw = await http.post("/v1/responses", json=_create(input="Hi", stream=True))
    names = [line.removeprefix("event: ") for line in raw.text.splitlines() if line.startswith("event: ")]
    assert names[0] == "response.created" and names[-1] in ("response.completed", "response.incomplete")


async def test_stream_helper_gives_the_final_response(client) -> None:
    async with client.responses.stream(**_create(input="Say hello", max_output_tokens=40)) as stream:
        events = [event async for event in stream]
        if events[-1].type == "response.completed":  # the helper's final response needs a completed one
            assert (await stream.get_final_response()).id == events[-1].response.id
    deltas = [event for event in events if event.type == "response.output_text.delta"]
    final = events[-1].response
    assert final.output_text == "".join(event.delta for event in deltas) and final.usage.output_tokens > 0
    assert deltas[-1].snapshot == final.output_text  # the helper accumulated the same text


async def test_previous_response_id_continues_the_conversation(client) -> None:
    first = await client.responses.create(**_create(input="My name is Ada.", instructions="Be brief."))
    second = await client.responses.create(**_create(input="What is my name?", previous_response_id=first.id))
    assert second.previous_response_id == first.id
    # The prompt holds the earlier turn (its input and output) and the new input: more tokens than alone.
    alone = await client.responses.create(**_create(input="What is my name?", store=False))
    assert second.usage.input_tokens > alone.usage.input_tokens + first.usage.output_tokens
    items = await client.responses.input_items.list(second.id)
    assert [item.content[0].text for item in items.data] == ["What is my name?"]


async def test_delete_removes_it(client) -> None:
    response = await client.responses.create(**_create(input="Hello"))
    await client.responses.delete(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.retrieve(response.id)
    with pytest.raises(openai.NotFoundError):
        await client.responses.delete(response.id)


async def test_message_items_with_text_parts(client) -> None:
    response = await client.responses.create(
        **_create(
            input=[
                {"role": "developer", "content": "Answer in one word."},
                {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]},
                {"role": "assistant", "content": [{"type": "output_text", "text": "Hi"}]},
                {"role": "user", "content": "Again"},
            ]
        )
    )
    assert response.status in ("completed", "incomplete")
    items = await client.responses.input_items.list(response.id, order="asc")
    assert [item.role for item in items.data] == ["developer", "user", "assistant", "user"]


async def test_background_response_is_polled_to_completion(client) -> None:
    response = await client.responses.create(**_create(input="Say hello", background=True, max_output_tokens=16))
    assert response.status in ("queued", "in_progress") and response.background
    finished = await _wait_finished(client, response.id)
    assert finished.status in ("completed", "incomplete") and finished.output_text
    # Its stream is kept: replayed whole, or after any sequence number with nothing repeated or lost.
    whole = [event async for event in await client.responses.retrieve(response.id, stream=True)]
    assert [event.sequence_number for event in whole] == list(range(len(whole)))
    assert whole[-1].response.output_text == finished.output_text
    after = await client.responses.retrieve(response.id, stream=True, starting_after=3)
    assert [event.model_dump() async for event in after] == [event.model_dump() for event in whole[4:]]


async def test_background_stream_follows_it_live(client) -> None:
    stream = await client.responses.create(**_create(input="Say hello", background=True, stream=True))
    events = [event async for event in stream]
    assert events[0].type == "response.created" and events[-1].type in ("response.completed", "response.incomplete")
    assert [event.sequence_number for event in events] == list(range(len(events)))


async def test_cancel_stops_a_background_response(client) -> None:
    response = await client.responses.create(
        **_create(input="Write a long story", background=True, max_output_tokens=470, extra_body={"top_p": 1.0})
    )
    cancelled = await client.responses.cancel(response.id)
    assert cancelled.status == "cancelled"
    await asyncio.sleep(1.5)  # the runner notices within its poll interval and stops
    stored = await client.responses.retrieve(response.id)
    assert stored.status == "cancelled"
    async with httpx.AsyncClient(base_url=str(client.base_url), timeout=30) as http:
        raw = await http.get(f"responses/{response.id}", params={"stream": "true"})
    names = [line.removeprefix("event: ") for line in raw.text.splitlines() if line.startswith("event: ")]
    assert names[-1] == "response.cancelled" and "response.completed" not in names
    # It stopped generating well before the 470 tokens it was allowed. The tiny model writes a few hundred tokens a
    # second on a fast CPU, so the bound leaves room for the runner's cancel poll (api/serving/response_runner.py).
    assert names.count("response.output_text.delta") < 400


async def test_cancel_of_a_foreground_response_is_refused(client) -> None:
    response = await client.responses.create(**_create(input="Hello"))
    with pytest.raises(openai.BadRequestError):
        await client.responses.cancel(response.id)


BAD = [
    ({"input": [{"type": "image_generation_call", "id": "x"}]}, "unknown item type"),
    ({"input": [{"type": "function_call_output", "call_id": "call_1", "output": "42"}]}, "has no function_call"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]}, "input_image"),
    ({"input": [{"role": "tool", "content": "x"}]}, "role"),
    ({}, "input"),
    ({"input": []}, "input"),
    (
        {"input": "hi", "tools": [{"type": "function", "name": "f"}], "tool_choice": {"type": "function", "name": "g"}},
        "'g', which is not among the tools",
    ),
    ({"input": "hi", "tool_choice": "required"}, "tool_choice needs tools"),
    ({"input": "hi", "tools": [{"type": "file_search", "vector_store_ids": []}]}, "only function tools"),
    ({"input": "hi", "previous_response_id": "resp_0123456789abcdef0123456789abcdef"}, "does not exist"),
]


@pytest.mark.parametrize(("fields", "words"), BAD, ids=[words for _, words in BAD])
async def test_bad_input_is_a_400_in_the_openai_shape(api, fields, words) -> None:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as http:
        answer = await http.post("/v1/responses", json={"model": TINY_MODEL_NAME, **fields})
    error = answer.json()["error"]
    assert answer.status_code in (400, 404) and words in error["message"], answer.text
    assert error["type"] in ("invalid_request_error", "not_found_error") and "code" in error
    assert (answer.status_code == 404) == (words == "does not exist")


async def test_tools_with_tool_choice_none_answer_in_text(client) -> None:
    response = await client.responses.create(
        **_create(input="Hello", tool_choice="none", tools=[{"type": "function", "name": "f", "parameters": {}}])
    )
    assert response.output[0].type == "message"
