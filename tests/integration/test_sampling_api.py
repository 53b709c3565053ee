"""The sampling output surface through the API: logprobs shapes (checked against a plain forward pass), echo,
prompt_logprobs, n>1 with per-choice finish reasons, best_of, several prompts in one request."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def reference(tiny_model_dir: Path):
    """log_softmax of the tiny model over a sequence: the logprob oracle."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, torch_dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)

    def logprobs(token_ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            return torch.log_softmax(model(torch.tensor([token_ids])).logits[0].float(), dim=-1)

    return tokenizer, logprobs


async def post(api, path: str, body: dict) -> dict:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        response = await http.post(path, json=body)
    assert response.status_code == 200, response.text
    return response.json()


async def test_completion_logprobs_match_a_forward_pass(api, reference) -> None:
    tokenizer, logprobs_of = reference
    prompt_ids = tokenizer.encode("A short prompt")
    body = await post(
        api,
        "/v1/completions",
        {
            "model": TINY_MODEL_NAME,
            "prompt": prompt_ids,
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": 3,
            "ignore_eos": True,
        },
    )
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == 6 == len(logprobs["token_logprobs"]) == len(logprobs["top_logprobs"])
    # Greedy output equals generate() (test_openai_api); rebuild the ids by arg-maxing the reference.
    generated: list[int] = []
    for _ in range(6):
        generated.append(int(logprobs_of(prompt_ids + generated)[-1].argmax()))
    reference_lp = logprobs_of(prompt_ids + generated)
    assert "".join(logprobs["tokens"]) == body["choices"][0]["text"]
    for step, token_id in enumerate(generated):
        row = reference_lp[len(prompt_ids) - 1 + step]
        assert logprobs["token_logprobs"][step] == pytest.approx(row[token_id].item(), abs=1e-3)
        assert len(logprobs["top_logprobs"][step]) == 3
    assert logprobs["text_offset"][0] == 0


async def test_echo_with_logprobs_prepends_the_prompt(api) -> None:
    body = await post(
        api,
        "/v1/completions",
        {
            "model": TINY_MODEL_NAME,
            "prompt": "Echo this",
            "max_tokens": 3,
            "temperature": 0,
            "echo": True,
            "logprobs": 1,
            "ignore_eos": True,
        },
    )
    choice = body["choices"][0]
    assert choice["text"].startswith("Echo this")
    assert choice["logprobs"]["token_logprobs"][0] is None  # nothing predicts the first prompt token
    assert len(choice["logprobs"]["tokens"]) == body["usage"]["prompt_tokens"] + 3


async def test_prompt_logprobs_in_vllm_shape(api, reference) -> None:
    tokenizer, logprobs_of = reference
    prompt_ids = tokenizer.encode("Prompt logprobs please")
    body = await post(
        api, "/v1/completions", {"model": TINY_MODEL_NAME, "prompt": prompt_ids, "max_tokens": 1, "prompt_logprobs": 2}
    )
    entries = body["choices"][0]["prompt_logprobs"]
    assert len(entries) == len(prompt_ids) and entries[0] is None
    reference_lp = logprobs_of(prompt_ids)
    for position in range(1, len(prompt_ids)):
        entry = entries[position][str(prompt_ids[position])]
        assert entry["logprob"] == pytest.approx(reference_lp[position - 1, prompt_ids[position]].item(), abs=1e-3)


async def test_chat_logprobs_shape(api) -> None:
    body = await post(
        api,
        "/v1/chat/completions",
        {
            "model": TINY_MODEL_NAME,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 4,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 2,
            "ignore_eos": True,
        },
    )
    content = body["choices"][0]["logprobs"]["content"]
    assert len(content) == 4
    for item in content:
        assert set(item) == {"token", "logprob", "bytes", "top_logprobs"}
        assert item["bytes"] == list(item["token"].encode())
        assert len(item["top_logprobs"]) == 2
        assert item["logprob"] <= 0


async def test_n_choices_are_distinct_and_each_finishes(api) -> None:
    body = await post(
        api,
        "/v1/completions",
        {
            "model": TINY_MODEL_NAME,
            "prompt": "Pick",
            "max_tokens": 8,
            "n": 3,
            "temperature": 1.0,
            "seed": 5,
            "ignore_eos": True,
        },
    )
    choices = body["choices"]
    assert [choice["index"] for choice in choices] == [0, 1, 2]
    assert len({choice["text"] for choice in choices}) > 1
    assert body["usage"]["completion_tokens"] == 24
    again = await post(
        api,
        "/v1/completions",
        {
            "model": TINY_MODEL_NAME,
            "prompt": "Pick",
            "max_tokens": 8,
            "n": 3,
            "temperature": 1.0,
            "seed": 5,
            "ignore_eos": True,
        },
    )
    assert [choice["text"] for choice in again["choices"]] == [choice["text"] for choice in choices]


async def test_streaming_n_gives_every_choice_its_finish_reason(api) -> None:
    body = {
        "model": TINY_MODEL_NAME,
        "messages": [{"role": "user", "content": "go"}],
        "max_tokens": 5,
        "n": 2,
        "temperature": 0.8,
        "stream": True,
        "ignore_eos": True,
    }
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        response = await http.post("/v1/chat/completions", json=body)
    chunks = [json.loads(line[6:]) for line in response.text.splitlines() if line.startswith("data: {")]
    finishes = {
        chunk["choices"][0]["index"]: chunk["choices"][0]["finish_reason"]
        for chunk in chunks
        if chunk["choices"][0]["finish_reason"]
    }
    assert finishes == {0: "length", 1: "length"}
    roles = [chunk["choices"][0]["index"] for chunk in chunks if chunk["choices"][0]["delta"].get("role")]
    assert sorted(roles) == [0, 1]


async def test_best_of_returns_n_choices(api) -> None:
    body = await post(
        api,
        "/v1/completions",
        {
            "model": TINY_MODEL_NAME,
            "prompt": "Best",
            "max_tokens": 4,
            "n": 1,
            "best_of": 3,
            "temperature": 1.0,
            "seed": 1,
            "ignore_eos": True,
        },
    )
    assert len(body["choices"]) == 1 and body["choices"][0]["finish_reason"] == "length"


async def test_several_prompts_in_one_request(api) -> None:
    single = [
        await post(
            api,
            "/v1/completions",
            {"model": TINY_MODEL_NAME, "prompt": prompt, "max_tokens": 5, "temperature": 0, "ignore_eos": True},
        )
        for prompt in ("First prompt", "Second")
    ]
    both = await post(
        api,
        "/v1/completions",
        {
            "model": TINY_MODEL_NAME,
            "prompt": ["First prompt", "Second"],
            "max_tokens": 5,
            "temperature": 0,
            "ignore_eos": True,
        },
    )
    assert [choice["text"] for choice in both["choices"]] == [s["choices"][0]["text"] for s in single]
    assert both["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in single)


async def test_streaming_prompt_logprobs_is_refused(api) -> None:
    async with httpx.AsyncClient(base_url=api.base_url) as http:
        response = await http.post(
            "/v1/completions", json={"model": TINY_MODEL_NAME, "prompt": "x", "stream": True, "prompt_logprobs": 1}
        )
    assert response.status_code == 400 and "prompt_logprobs" in response.json()["error"]["message"]
