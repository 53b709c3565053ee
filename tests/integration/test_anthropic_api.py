"""Anthropic Messages through the official `anthropic` SDK: API → JetStream → the tiny model's worker."""

from __future__ import annotations

import uuid
from pathlib import Path

import anthropic
import httpx
import pytest

from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio
CONVERSATION = [{"role": "user", "content": "Name three colours."}]
SYSTEM = "You answer briefly."


@pytest.fixture
async def client(api):
    async with anthropic.AsyncAnthropic(base_url=api.base_url, api_key="unused", max_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


def template_ids(hf_tokenizer, messages: list[dict]) -> list[int]:
    text = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return hf_tokenizer.encode(text, add_special_tokens=False)


async def greedy(client: anthropic.AsyncAnthropic, max_tokens: int = 12, **kwargs) -> anthropic.types.Message:
    # The 2.x SDK dropped sampling parameters from its signature; the API (and older SDKs) still take them.
    return await client.messages.create(
        model=TINY_MODEL_NAME,
        max_tokens=max_tokens,
        messages=CONVERSATION,
        system=SYSTEM,
        extra_body={"temperature": 0},
        **kwargs,
    )


async def test_create_returns_an_anthropic_message(client, hf_tokenizer) -> None:
    message = await greedy(client, max_tokens=5)
    assert message.id.startswith("msg_") and message.type == "message" and message.role == "assistant"
    assert message.model == TINY_MODEL_NAME
    [block] = message.content
    assert block.type == "text" and block.text
    assert message.stop_reason == "max_tokens" and message.stop_sequence is None
    assert message.usage.output_tokens == 5
    # The system prompt is rendered through the model's chat template, as the first message.
    expected = template_ids(hf_tokenizer, [{"role": "system", "content": SYSTEM}, *CONVERSATION])
    assert message.usage.input_tokens == len(expected)


async def test_count_tokens_matches_the_prompt_of_create(client, hf_tokenizer) -> None:
    blocks = [
        {"role": "user", "content": [{"type": "text", "text": "Name three "}, {"type": "text", "text": "colours."}]}
    ]
    counted = await client.messages.count_tokens(
        model=TINY_MODEL_NAME, messages=blocks, system=[{"type": "text", "text": SYSTEM}]
    )
    expected = template_ids(hf_tokenizer, [{"role": "system", "content": SYSTEM}, *CONVERSATION])
    assert counted.input_tokens == len(expected) == (await greedy(client, max_tokens=1)).usage.input_tokens


async def test_stream_reassembles_the_greedy_message(client) -> None:
    plain = await greedy(client)
    async with client.messages.stream(
        model=TINY_MODEL_NAME, max_tokens=12, messages=CONVERSATION, system=SYSTEM, extra_body={"temperature": 0}
    ) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) > 1 and "".join(pieces) == plain.content[0].text
    assert final.content[0].text == plain.content[0].text
    assert (final.stop_reason, final.usage.output_tokens, final.usage.input_tokens) == (
        plain.stop_reason,
        plain.usage.output_tokens,
        plain.usage.input_tokens,
    )


async def test_raw_stream_has_the_named_events_in_order(api) -> None:
    body = {"model": TINY_MODEL_NAME, "max_tokens": 3, "messages": CONVERSATION, "stream": True, "temperature": 0}
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        response = await http.post("/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
    names = [line.removeprefix("event: ") for line in response.text.splitlines() if line.startswith("event: ")]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert set(names[3:-3]) == {"content_block_delta"}
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert "[DONE]" not in response.text


async def test_stop_sequence_ends_the_message_where_it_first_appears(client) -> None:
    text = (await greedy(client, max_tokens=16)).content[0].text
    stop = next(text[i : i + 2] for i in range(2, len(text) - 1) if text[i : i + 2].strip())
    message = await greedy(client, max_tokens=16, stop_sequences=[stop])
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == stop
    assert message.content[0].text == text[: text.find(stop)]


async def test_assistant_prefill_is_continued(client) -> None:
    conversation = [*CONVERSATION, {"role": "assistant", "content": "Red,"}]
    message = await client.messages.create(model=TINY_MODEL_NAME, max_tokens=3, messages=conversation)
    assert message.usage.output_tokens == 3 and message.content[0].text


async def test_idempotency_key_attaches_to_the_same_message(client) -> None:
    key = {"Idempotency-Key": f"k-{uuid.uuid4()}"}
    first, second = [
        await client.messages.create(model=TINY_MODEL_NAME, max_tokens=8, messages=CONVERSATION, extra_headers=key)
        for _ in range(2)
    ]
    assert first.id == second.id and first.content[0].text == second.content[0].text


def assert_anthropic_error(response: httpx.Response, status: int, error_type: str, needle: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == error_type, body
    assert needle in body["error"]["message"], body


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"max_tokens": None}, "max_tokens"),
        (
            {"messages": [{"role": "user", "content": [{"type": "hologram", "text": "hi"}]}]},
            "unknown content block type 'hologram'",
        ),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": "1"}]}]},
            "no tool_use block with that id",
        ),
        ({"thinking": {"type": "enabled", "budget_tokens": 1024}}, "thinking"),
        ({"output_config": {"format": {"type": "json_schema", "schema": {}}}}, "structured output"),
        ({"temperature": 1.5}, "temperature"),
        ({"messages": []}, "messages"),
    ],
)
async def test_bad_requests_are_400_in_anthropic_shape(api, change, needle) -> None:
    body = {"model": TINY_MODEL_NAME, "max_tokens": 4, "messages": CONVERSATION} | change
    body = {key: value for key, value in body.items() if value is not None}
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        assert_anthropic_error(await http.post("/v1/messages", json=body), 400, "invalid_request_error", needle)


async def test_sdk_raises_its_typed_errors(client) -> None:
    with pytest.raises(anthropic.BadRequestError) as bad:
        await client.messages.create(
            model=TINY_MODEL_NAME, max_tokens=4, messages=[{"role": "user", "content": [{"type": "hologram"}]}]
        )
    assert bad.value.body["error"]["type"] == "invalid_request_error"
    with pytest.raises(anthropic.NotFoundError) as missing:
        await client.messages.create(model="no-such-model", max_tokens=4, messages=CONVERSATION)
    assert missing.value.body["error"]["type"] == "not_found_error"
    # Tools are accepted with tool_choice none: they are never called, so the text conversation is served.
    message = await client.messages.create(
        model=TINY_MODEL_NAME,
        max_tokens=2,
        messages=CONVERSATION,
        tools=[{"name": "f", "input_schema": {"type": "object"}}],
        tool_choice={"type": "none"},
    )
    assert message.usage.output_tokens == 2
