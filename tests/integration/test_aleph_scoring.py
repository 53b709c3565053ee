"""Aleph Alpha `/evaluate` and `/embed` through the real `aleph-alpha-client`, checked against a plain
transformers forward pass computed in the test."""

from __future__ import annotations

from pathlib import Path

import aleph_alpha_client as aa
import numpy as np
import pytest
import torch

from tests.integration.conftest import EMBEDDER
from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio


@pytest.fixture
async def client(api):
    async with aa.AsyncClient(token="dummy", host=api.base_url, total_retries=0) as client:
        yield client


def reference_scores(model_dir: Path, prompt: str, expected: str) -> tuple[float, bool, str]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    prompt_ids = tokenizer.encode(prompt)
    expected_ids = tokenizer.encode(expected, add_special_tokens=False)
    ids = torch.tensor([prompt_ids + expected_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), dim=-1)
    rows = logprobs[len(prompt_ids) - 1 : -1]
    picked = rows[torch.arange(len(expected_ids)), torch.tensor(expected_ids)]
    greedy = rows.argmax(-1).tolist()
    return picked.sum().item(), greedy == expected_ids, tokenizer.decode(greedy)


async def test_evaluate_matches_a_forward_pass(client, tiny_model_dir: Path) -> None:
    prompt, expected = "An apple a day keeps", " the doctor away"
    response = await client.evaluate(
        aa.EvaluationRequest(prompt=aa.Prompt.from_text(prompt), completion_expected=expected), model=TINY_MODEL_NAME
    )
    log_probability, correct, completion = reference_scores(tiny_model_dir, prompt, expected)
    result = response.result
    assert result["log_probability"] == pytest.approx(log_probability, abs=1e-3)
    assert result["log_perplexity"] == pytest.approx(-log_probability, abs=1e-3)
    assert result["log_perplexity_per_character"] == pytest.approx(-log_probability / len(expected), abs=1e-3)
    assert result["correct_greedy"] is correct
    assert result["completion"] == completion
    assert result["character_count"] == len(expected)
    assert result["log_perplexity_per_token"] == pytest.approx(-log_probability / result["token_count"], abs=1e-3)


async def test_evaluate_what_greedy_would_say_is_correct(client, api) -> None:
    """Score greedy's own continuation: it must come back correct_greedy with the same text."""
    import httpx

    prompt = "Once upon a time"
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        greedy = (
            await http.post(
                "/v1/completions",
                json={
                    "model": TINY_MODEL_NAME,
                    "prompt": prompt,
                    "max_tokens": 4,
                    "temperature": 0,
                    "ignore_eos": True,
                },
            )
        ).json()["choices"][0]["text"]
    response = await client.evaluate(
        aa.EvaluationRequest(prompt=aa.Prompt.from_text(prompt), completion_expected=greedy), model=TINY_MODEL_NAME
    )
    assert response.result["correct_greedy"] is True
    assert response.result["completion"] == greedy


async def test_embed_layers_and_poolings(client, embedder) -> None:
    from transformers import AutoModel, AutoTokenizer

    from common.models import PACKAGED_MODELS, packaged_model

    request = aa.EmbeddingRequest(
        prompt=aa.Prompt.from_text("hello world"), layers=[0, -1], pooling=["mean", "max"], tokens=True
    )
    response = await client.embed(request, model=EMBEDDER)
    assert set(response.embeddings) == {
        ("layer_0", "mean"),
        ("layer_0", "max"),
        ("layer_6", "mean"),
        ("layer_6", "max"),
    }
    directory = packaged_model(PACKAGED_MODELS[EMBEDDER])
    tokenizer, model = AutoTokenizer.from_pretrained(directory), AutoModel.from_pretrained(directory).eval()
    with torch.no_grad():
        states = model(**tokenizer("hello world", return_tensors="pt"), output_hidden_states=True).hidden_states
    assert np.allclose(response.embeddings[("layer_6", "mean")], states[6][0].mean(0).numpy(), atol=1e-4)
    assert np.allclose(response.embeddings[("layer_0", "max")], states[0][0].max(0).values.numpy(), atol=1e-4)
    assert response.tokens == tokenizer.convert_ids_to_tokens(tokenizer.encode("hello world"))


async def test_embed_refuses_semantic_type(api) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=api.base_url) as http:
        response = await http.post(
            "/embed", json={"model": EMBEDDER, "prompt": "x", "layers": [-1], "pooling": ["mean"], "type": "symmetric"}
        )
    assert response.status_code == 400 and "type" in response.json()["error"]["message"]
