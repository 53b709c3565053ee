"""The whole request path with real parts: openai SDK → API → JetStream → worker process → token events."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import openai
import pytest

from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio


def hf_greedy(model_dir: Path, prompt_ids: list[int], max_new_tokens: int) -> list[int]:
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32)
    out = model.generate(
        torch.tensor([prompt_ids]), max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0
    )
    return out[0, len(prompt_ids) :].tolist()


@pytest.fixture(scope="module")
def client(api) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0)


async def test_models_lists_the_live_model(client: openai.AsyncOpenAI, api) -> None:
    models = await client.models.list()
    # Other modules start (and kill) workers for other model ids; this one is always there.
    cards = {model.id: model.model_dump() for model in models.data}
    card = cards[TINY_MODEL_NAME]
    assert card["max_model_len"] == 512 and card["owned_by"] == "inferq" and card["permission"]
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        assert (await http.get(f"/v1/models/{TINY_MODEL_NAME}")).json()["id"] == TINY_MODEL_NAME
        missing = await http.get("/v1/models/no-such-model")
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"


async def test_health_reports_the_worker(api) -> None:
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        response = await http.get("/health")
    assert response.status_code == 200
    assert response.json()["status"] == "healthy" and TINY_MODEL_NAME in response.json()["models"]


async def test_greedy_completion_equals_transformers_generate(client, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = "The quick brown fox jumps over the lazy dog and"
    prompt_ids = tokenizer.encode(prompt)
    expected = hf_greedy(tiny_model_dir, prompt_ids, 12)

    completion = await client.completions.create(
        model=TINY_MODEL_NAME, prompt=prompt, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    choice = completion.choices[0]
    assert choice.text == tokenizer.decode(expected)
    assert choice.finish_reason == "length"
    assert completion.usage.prompt_tokens == len(prompt_ids) and completion.usage.completion_tokens == 12
    assert completion.object == "text_completion" and completion.id.startswith("cmpl-")

    # The same request as token ids gives the same text.
    by_ids = await client.completions.create(
        model=TINY_MODEL_NAME, prompt=prompt_ids, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    assert by_ids.choices[0].text == choice.text


async def test_streamed_completion_matches_non_streamed(client) -> None:
    kwargs = {
        "model": TINY_MODEL_NAME,
        "prompt": "Once upon a time",
        "max_tokens": 10,
        "temperature": 0,
        "extra_body": {"ignore_eos": True},
    }
    full = await client.completions.create(**kwargs)
    stream = await client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    async for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage:
            usage = chunk.usage
    assert "".join(pieces) == full.choices[0].text
    assert finish == "length"
    assert usage is not None and usage.completion_tokens == 10


async def test_chat_completion_uses_the_chat_template(client, tiny_model_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    messages = [{"role": "user", "content": "Say hello"}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    expected = tokenizer.decode(hf_greedy(tiny_model_dir, list(prompt_ids), 8), skip_special_tokens=True)

    chat = await client.chat.completions.create(
        model=TINY_MODEL_NAME, messages=messages, max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
    )
    assert chat.choices[0].message.role == "assistant"
    assert chat.choices[0].message.content == expected
    assert chat.usage.prompt_tokens == len(prompt_ids)

    stream = await client.chat.completions.create(
        model=TINY_MODEL_NAME,
        messages=messages,
        max_tokens=8,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    roles, text, finishes = [], [], []
    async for chunk in stream:
        delta = chunk.choices[0].delta
        roles.append(delta.role)
        text.append(delta.content or "")
        finishes.append(chunk.choices[0].finish_reason)
    assert roles[0] == "assistant" and "".join(text) == expected and finishes[-1] == "length"


async def test_seeded_sampling_is_reproducible(client) -> None:
    kwargs = {
        "model": TINY_MODEL_NAME,
        "prompt": "Numbers:",
        "max_tokens": 8,
        "temperature": 1.0,
        "seed": 1234,
        "extra_body": {"ignore_eos": True},
    }
    first = await client.completions.create(**kwargs)
    second = await client.completions.create(**kwargs)
    assert first.choices[0].text == second.choices[0].text


async def test_stop_string_ends_the_completion(client) -> None:
    free = await client.completions.create(
        model=TINY_MODEL_NAME, prompt="Hello", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    text = free.choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3].strip() or text[-2:]
    stopped = await client.completions.create(
        model=TINY_MODEL_NAME,
        prompt="Hello",
        max_tokens=12,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    assert stopped.choices[0].finish_reason == "stop"
    assert stopped.choices[0].text == text[: text.index(stop)]


@pytest.mark.parametrize(
    ("body", "param_hint"),
    [
        ({"model": TINY_MODEL_NAME, "prompt": "x", "temperature": 5}, "temperature"),
        ({"model": TINY_MODEL_NAME, "prompt": "x", "max_tokens": -1}, "max_tokens"),
        ({"model": TINY_MODEL_NAME, "prompt": "x", "top_p": 0}, "top_p"),
        ({"model": TINY_MODEL_NAME, "prompt": "x", "n": "many"}, "n"),
        ({"model": TINY_MODEL_NAME}, "prompt"),
        ({"model": TINY_MODEL_NAME, "prompt": "x", "tools": [{"type": "function"}]}, "tools"),
        ({"model": TINY_MODEL_NAME, "prompt": [10**9]}, "prompt"),
    ],
)
async def test_invalid_parameters_are_400_in_openai_shape(api, body: dict, param_hint: str) -> None:
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        response = await http.post("/v1/completions", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert param_hint in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


async def test_malformed_json_is_400(api) -> None:
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        response = await http.post(
            "/v1/chat/completions",
            content=b'{"model": "x", "messages": [',
            headers={"content-type": "application/json"},
        )
    assert response.status_code == 400
    assert response.json()["error"]["type"] == "invalid_request_error"


async def test_prompt_beyond_context_is_400_with_numbers(api) -> None:
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        response = await http.post(
            "/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": [5] * 500, "max_tokens": 100}
        )
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded"
    assert "512" in error["message"] and "600" in error["message"]


async def test_unknown_model_is_404(client) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        await client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    assert caught.value.body["code"] == "model_not_found"


async def test_known_model_without_worker_is_503(api, nats_server) -> None:
    from broker.connection import connect
    from broker.topology import QueueLimits, ensure_request_queue

    async with connect(nats_server.url, "test") as nc:
        await ensure_request_queue(nc.jetstream(), "ghost-model", QueueLimits(10, 60, 60))
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        response = await http.post("/v1/completions", json={"model": "ghost-model", "prompt": "hi"})
    assert response.status_code == 503
    assert response.json()["error"]["code"] == "no_worker"


async def test_sse_wire_format(api) -> None:
    body = {
        "model": TINY_MODEL_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "stream": True,
        "temperature": 0,
        "ignore_eos": True,
    }
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        response = await http.post("/v1/chat/completions", json=body)
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [event.split("\n") for event in response.text.split("\n\n") if event]
    assert events[-1] == ["data: [DONE]"]
    # Every chunk event carries an id to resume after (Last-Event-ID): <request id>/<chunk index>.
    assert all(
        len(event) == 2 and event[0].startswith("id: ") and event[1].startswith("data: ") for event in events[:-1]
    )
    chunks = [json.loads(data[len("data: ") :]) for _, data in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert len({chunk["id"] for chunk in chunks}) == 1
    assert [event_id for event_id, _ in events[:-1]] == [
        f"id: {chunks[0]['id']}/{index}" for index in range(len(chunks))
    ]
