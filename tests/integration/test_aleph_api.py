"""The Aleph Alpha surface driven by the real `aleph-alpha-client` (sync and async) against the real API and worker."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import aleph_alpha_client as aa
import httpx
import openai
import pytest

from broker import subjects
from contracts import GenerateRequest
from tests.integration.observe import observed
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio

PROMPT = "The quick brown fox jumps over the lazy dog and"


@pytest.fixture
async def client(api):
    async with aa.AsyncClient(token="dummy", host=api.base_url, total_retries=0) as client:
        yield client


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


async def openai_greedy(api, prompt: str, max_tokens: int) -> openai.types.Completion:
    async with openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0) as client:
        return await client.completions.create(
            model=TINY_MODEL_NAME, prompt=prompt, max_tokens=max_tokens, temperature=0
        )


def request(prompt: str = PROMPT, **kwargs) -> aa.CompletionRequest:
    return aa.CompletionRequest(prompt=aa.Prompt.from_text(prompt), **kwargs)


async def test_version_and_models(api, client) -> None:
    await client.validate_version()
    await asyncio.to_thread(aa.Client(token="dummy", host=api.base_url, total_retries=0).validate_version)
    [model] = [model for model in await client.models() if model["name"] == TINY_MODEL_NAME]
    assert model["max_context_size"] == 512 and model["hostings"] == []
    assert model["image_support"] is False and model["aligned"] is True  # SmolLM2 ships a chat template


async def test_greedy_complete_equals_openai_completions(api, client, hf_tokenizer) -> None:
    expected = await openai_greedy(api, PROMPT, 12)
    response = await client.complete(request(maximum_tokens=12, tokens=True, log_probs=2), model=TINY_MODEL_NAME)
    [completion] = response.completions
    assert completion.completion == expected.choices[0].text
    assert completion.raw_completion == completion.completion
    assert (
        completion.finish_reason
        == {"length": "maximum_tokens", "stop": "end_of_text"}[expected.choices[0].finish_reason]
    )
    assert response.model_version == TINY_MODEL_NAME
    assert response.num_tokens_prompt_total == len(hf_tokenizer.encode(PROMPT))
    assert response.num_tokens_generated == expected.usage.completion_tokens == len(completion.completion_tokens)
    # "The completion split into tokens": decoded text, not the vocabulary's strings (`Ġ` for a space).
    assert "".join(completion.completion_tokens) == completion.completion
    assert len(completion.log_probs) == len(completion.completion_tokens)
    for entry in completion.log_probs:  # the chosen token plus up to two alternatives, all finite
        assert 1 <= len(entry) <= 3 and all(value <= 0 for value in entry.values())


async def test_sync_client_nice_flag_and_token_prompt(api, hf_tokenizer) -> None:
    expected = (await openai_greedy(api, PROMPT, 8)).choices[0].text
    by_tokens = aa.CompletionRequest(
        prompt=aa.Prompt([aa.Tokens.from_token_ids(hf_tokenizer.encode(PROMPT))]), maximum_tokens=8
    )

    def complete_both() -> list[str]:
        client = aa.Client(token="dummy", host=api.base_url, total_retries=0, nice=True)
        return [
            client.complete(req, model=TINY_MODEL_NAME).completions[0].completion
            for req in (request(maximum_tokens=8), by_tokens)
        ]

    assert await asyncio.to_thread(complete_both) == [expected, expected]


async def test_stop_sequence_and_echo(api, client) -> None:
    full = (await client.complete(request(maximum_tokens=16), model=TINY_MODEL_NAME)).completions[0].completion
    stop = full[6:9]
    assert stop.strip(), f"pick a visible stop sequence from {full!r}"
    stopped = (
        await client.complete(request(maximum_tokens=16, stop_sequences=[stop]), model=TINY_MODEL_NAME)
    ).completions[0]
    assert stopped.finish_reason == "stop_sequence_reached"
    assert stopped.completion == full[: full.index(stop)]

    echoed = await client.complete(request(maximum_tokens=4, echo=True, log_probs=0), model=TINY_MODEL_NAME)
    first4 = (await client.complete(request(maximum_tokens=4), model=TINY_MODEL_NAME)).completions[0].completion
    assert echoed.completions[0].completion == PROMPT + first4
    log_probs = echoed.completions[0].log_probs
    assert list(log_probs[0].values()) == [None]  # nothing predicts the first prompt token
    assert len(log_probs) == echoed.num_tokens_prompt_total + echoed.num_tokens_generated


async def test_completion_tokens_join_to_the_completion(client) -> None:
    """With a stop sequence (tokens past it are cut), with echo (the prompt's tokens first), and streamed."""
    full = (await client.complete(request(maximum_tokens=16), model=TINY_MODEL_NAME)).completions[0].completion
    stop = next(full[i : i + 2] for i in range(4, len(full) - 1) if full[i : i + 2].strip())
    for fields in ({"stop_sequences": [stop]}, {"echo": True}, {}):
        [completion] = (
            await client.complete(request(maximum_tokens=16, tokens=True, **fields), model=TINY_MODEL_NAME)
        ).completions
        assert "".join(completion.completion_tokens) == completion.completion, fields
        assert not any(piece.startswith("\u0120") for piece in completion.completion_tokens), fields  # Ġ
    streamed = [
        item
        async for item in client.complete_with_streaming(request(maximum_tokens=16, tokens=True), model=TINY_MODEL_NAME)
        if isinstance(item, aa.completion.StreamChunk)
    ]
    assert "".join(piece for chunk in streamed for piece in chunk.completion_tokens) == full
    assert all("".join(chunk.completion_tokens) == chunk.completion for chunk in streamed)


async def test_streaming_matches_the_plain_response(client) -> None:
    plain = await client.complete(request(maximum_tokens=10), model=TINY_MODEL_NAME)
    chunks, summaries, totals = [], [], []
    async for item in client.complete_with_streaming(request(maximum_tokens=10), model=TINY_MODEL_NAME):
        {
            aa.completion.StreamChunk: chunks,
            aa.completion.StreamSummary: summaries,
            aa.completion.CompletionSummary: totals,
        }[type(item)].append(item)
    assert "".join(chunk.completion for chunk in chunks) == plain.completions[0].completion
    assert [(s.index, s.finish_reason, s.model_version) for s in summaries] == [
        (0, plain.completions[0].finish_reason, TINY_MODEL_NAME)
    ]
    assert [(t.num_tokens_prompt_total, t.num_tokens_generated) for t in totals] == [
        (plain.num_tokens_prompt_total, plain.num_tokens_generated)
    ]


async def test_raw_stream_events(api, hf_tokenizer) -> None:
    body = {"model": TINY_MODEL_NAME, "prompt": PROMPT, "maximum_tokens": 3, "n": 2, "stream": True, "tokens": True}
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        async with http.stream("POST", "/complete", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = [line async for line in response.aiter_lines() if line]
    events = [json.loads(line.removeprefix("data: ")) for line in lines]  # no `[DONE]` in Aleph Alpha's stream
    chunks = [e for e in events if e["type"] == "stream_chunk"]
    assert events[-1] == {
        "type": "completion_summary",
        "num_tokens_prompt_total": 2 * len(hf_tokenizer.encode(PROMPT)),
        "num_tokens_generated": sum(len(e["completion_tokens"]) for e in chunks),
    }
    assert sorted(e["index"] for e in events if e["type"] == "stream_summary") == [0, 1]
    assert {e["index"] for e in chunks} == {0, 1}


async def test_n_and_best_of(client) -> None:
    response = await client.complete(request(maximum_tokens=4, n=2), model=TINY_MODEL_NAME)
    assert len(response.completions) == 2
    assert response.completions[0].completion == response.completions[1].completion  # greedy
    best = await client.complete(request(maximum_tokens=4, best_of=2, temperature=1.0), model=TINY_MODEL_NAME)
    # Aleph Alpha counts the prompt once per candidate.
    assert len(best.completions) == 1 and best.num_tokens_prompt_total == response.num_tokens_prompt_total


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"sequence_penalty": 0.5}, "sequence_penalty"),
        ({"presence_penalty": 0.5, "use_multiplicative_presence_penalty": True}, "multiplicative"),
        ({"presence_penalty": 0.5, "repetition_penalties_include_prompt": True}, "completion tokens only"),
        ({"completion_bias_inclusion": ["yes"]}, "completion_bias"),
        ({"maximum_tokens": 5000}, "context length"),
    ],
)
async def test_unsupported_or_invalid_requests_are_400(client, fields, needle) -> None:
    with pytest.raises(ValueError) as raised:
        await client.complete(request(**{"maximum_tokens": 4, **fields}), model=TINY_MODEL_NAME)
    status, text = raised.value.args
    assert status == 400 and needle in text


async def test_image_prompt_and_unknown_model_are_400(api, client) -> None:
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        image = await http.post(
            "/complete",
            json={
                "model": TINY_MODEL_NAME,
                "maximum_tokens": 2,
                "prompt": [{"type": "image", "data": "aGVsbG8="}, {"type": "text", "data": "What is it?"}],
            },
        )
    assert image.status_code == 400 and "image" in image.json()["error"]["message"]
    with pytest.raises(ValueError):
        await client.complete(request(maximum_tokens=2), model="no-such-model")


async def test_penalties_the_engine_can_express_are_accepted(client) -> None:
    response = await client.complete(
        request(maximum_tokens=8, presence_penalty=1.0, frequency_penalty=0.5), model=TINY_MODEL_NAME
    )
    assert len(response.completions) == 1 and response.num_tokens_generated >= 1


async def test_client_tokenizer_download(client, hf_tokenizer) -> None:
    tokenizer = await client.tokenizer(TINY_MODEL_NAME)
    assert tokenizer.encode(PROMPT, add_special_tokens=False).ids == hf_tokenizer.encode(PROMPT)


async def test_nice_requests_are_queued_at_a_lower_priority(api, nats_server) -> None:
    subject = subjects.request_subject(TINY_MODEL_NAME)
    async with observed(nats_server.url, subject, GenerateRequest.from_bytes) as queued:
        for nice in (False, True):
            async with aa.AsyncClient(token="dummy", host=api.base_url, total_retries=0, nice=nice) as client:
                assert (await client.complete(request(maximum_tokens=2), model=TINY_MODEL_NAME)).completions
        priorities = [(await asyncio.wait_for(queued.get(), 5)).priority for _ in range(2)]
    assert priorities == [0, 1]  # lower runs first
