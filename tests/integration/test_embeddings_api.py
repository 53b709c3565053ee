"""`/v1/embeddings` through the real path with a dedicated embedding model (the packaged all-MiniLM-L6-v2)
served by its own worker next to the LLM, driven by the openai SDK."""

from __future__ import annotations

import base64
import struct

import httpx
import numpy as np
import openai
import pytest

from tests.integration.conftest import EMBEDDER

pytestmark = pytest.mark.asyncio


@pytest.fixture(scope="module")
def reference(embedder):
    """sentence-transformers' recipe for this model, computed here independently: mean pooling + L2 norm."""
    import torch
    from transformers import AutoModel, AutoTokenizer

    from common.models import PACKAGED_MODELS, packaged_model

    directory = packaged_model(PACKAGED_MODELS[EMBEDDER])
    tokenizer, model = AutoTokenizer.from_pretrained(directory), AutoModel.from_pretrained(directory).eval()

    def embed(text: str) -> np.ndarray:
        with torch.no_grad():
            hidden = model(**tokenizer(text, return_tensors="pt")).last_hidden_state[0].mean(0)
        return torch.nn.functional.normalize(hidden, dim=0).numpy()

    return embed


async def test_openai_sdk_embeddings_match_the_reference(api, reference) -> None:
    client = openai.AsyncOpenAI(base_url=f"{api.base_url}/v1", api_key="unused", max_retries=0)
    texts = ["Queues make inference durable.", "A cat on a mat."]
    response = await client.embeddings.create(model=EMBEDDER, input=texts)
    assert [item.index for item in response.data] == [0, 1]
    for item, text in zip(response.data, texts, strict=True):
        assert len(item.embedding) == 384
        assert np.allclose(item.embedding, reference(text), atol=1e-4)
    assert response.usage.prompt_tokens > 0 and response.usage.total_tokens == response.usage.prompt_tokens


async def test_base64_and_dimensions(api, reference) -> None:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        body = (
            await http.post(
                "/v1/embeddings",
                json={"model": EMBEDDER, "input": "hello", "encoding_format": "base64", "dimensions": 64},
            )
        ).json()
    raw = base64.b64decode(body["data"][0]["embedding"])
    values = np.array(struct.unpack(f"<{len(raw) // 4}f", raw))
    assert len(values) == 64 and np.isclose(np.linalg.norm(values), 1.0, atol=1e-5)
    truncated = reference("hello")[:64]
    assert np.allclose(values, truncated / np.linalg.norm(truncated), atol=1e-4)


async def test_embedding_model_refuses_generation_and_bad_input(api) -> None:
    async with httpx.AsyncClient(base_url=api.base_url, timeout=60) as http:
        generate = await http.post("/v1/completions", json={"model": EMBEDDER, "prompt": "hi"})
        empty = await http.post("/v1/embeddings", json={"model": EMBEDDER, "input": ""})
        too_long = await http.post("/v1/embeddings", json={"model": EMBEDDER, "input": [[1000] * 600]})
    assert generate.status_code == 400 and "embedding model" in generate.json()["error"]["message"]
    assert empty.status_code == 400
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"
