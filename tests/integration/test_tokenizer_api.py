"""The tokenizer surface on the real API: vLLM and Aphrodite guide shapes via httpx, Aleph Alpha's with its real client,
all served from the tokenizer the worker published."""

from __future__ import annotations

import asyncio
from pathlib import Path

import aleph_alpha_client as aa
import httpx
import pytest

from tests.model_fixtures import TINY_MODEL_NAME

pytestmark = pytest.mark.asyncio

TEXT = "Hello, world! Tokenizers split text."


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture
async def http(api):
    async with httpx.AsyncClient(base_url=api.base_url, timeout=30) as client:
        yield client


async def test_vllm_tokenize_matches_the_model_tokenizer_and_round_trips(http, hf_tokenizer) -> None:
    response = await http.post("/tokenize", json={"model": TINY_MODEL_NAME, "prompt": TEXT, "return_token_strs": True})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = hf_tokenizer.encode(TEXT)
    assert body == {
        "count": len(expected),
        "max_model_len": 512,
        "tokens": expected,
        "token_strs": hf_tokenizer.convert_ids_to_tokens(expected),
    }

    # `model` is optional (the first served model); token_strs only on request.
    plain = (await http.post("/tokenize", json={"model": TINY_MODEL_NAME, "prompt": TEXT})).json()
    assert plain["tokens"] == expected and plain["token_strs"] is None

    back = await http.post("/detokenize", json={"model": TINY_MODEL_NAME, "tokens": expected})
    assert back.status_code == 200 and back.json() == {"prompt": TEXT}


async def test_vllm_tokenize_messages_uses_the_chat_template(http, hf_tokenizer) -> None:
    messages = [{"role": "user", "content": "What is 2+2?"}]
    body = (await http.post("/tokenize", json={"model": TINY_MODEL_NAME, "messages": messages})).json()
    expected = hf_tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert body["tokens"] == list(expected)
    rendered = (await http.post("/detokenize", json={"model": TINY_MODEL_NAME, "tokens": body["tokens"]})).json()[
        "prompt"
    ]
    assert rendered.endswith("<|im_start|>assistant\n") and "What is 2+2?" in rendered

    without = (
        await http.post(
            "/tokenize", json={"model": TINY_MODEL_NAME, "messages": messages, "add_generation_prompt": False}
        )
    ).json()
    assert without["count"] < body["count"]


async def test_seed_text_shape_on_v1(http, hf_tokenizer) -> None:
    response = await http.post("/v1/tokenize", json={"model": TINY_MODEL_NAME, "text": TEXT})
    assert response.status_code == 200, response.text
    body = response.json()
    expected = hf_tokenizer.encode(TEXT)
    assert body["tokens"] == expected and body["token_count"] == len(expected) == body["count"]
    assert "".join(body["token_strings"]) == TEXT
    assert body["max_model_len"] == 512
    back = await http.post("/v1/detokenize", json={"model": TINY_MODEL_NAME, "tokens": body["tokens"]})
    assert back.json() == {"prompt": TEXT}


async def test_tokenizer_errors(http, hf_tokenizer) -> None:
    both = await http.post("/tokenize", json={"prompt": "a", "text": "b"})
    assert both.status_code == 400 and "exactly one" in both.json()["error"]["message"]
    unknown = await http.post("/tokenize", json={"model": "no-such-model", "prompt": "a"})
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "model_not_found"
    out_of_vocab = await http.post("/detokenize", json={"model": TINY_MODEL_NAME, "tokens": [len(hf_tokenizer) + 7]})
    assert out_of_vocab.status_code == 400 and out_of_vocab.json()["error"]["param"] == "tokens"
    template = await http.post(
        "/tokenize",
        json={
            "model": TINY_MODEL_NAME,
            "messages": [{"role": "user", "content": "x"}],
            "chat_template": "{{ messages }}",
        },
    )
    assert template.status_code == 400
    assert (await http.post("/tokenize", json=[1, 2])).status_code == 400


async def test_aleph_alpha_client_tokenize_and_detokenize(api, hf_tokenizer) -> None:
    async with aa.AsyncClient(token="dummy", host=api.base_url, total_retries=0) as client:
        response = await client.tokenize(
            aa.TokenizationRequest(prompt=TEXT, tokens=True, token_ids=True), model=TINY_MODEL_NAME
        )
        expected = hf_tokenizer.encode(TEXT, add_special_tokens=False)
        assert response.token_ids == expected
        assert response.tokens == hf_tokenizer.convert_ids_to_tokens(expected)

        only_ids = await client.tokenize(
            aa.TokenizationRequest(prompt=TEXT, tokens=False, token_ids=True), model=TINY_MODEL_NAME
        )
        assert only_ids.tokens is None and only_ids.token_ids == expected

        back = await client.detokenize(aa.DetokenizationRequest(token_ids=expected), model=TINY_MODEL_NAME)
        assert back.result == TEXT

        # The client's error vocabulary: an unknown model is a 400 (ValueError), not a bare RuntimeError(404).
        with pytest.raises(ValueError):
            await client.tokenize(aa.TokenizationRequest(prompt=TEXT, tokens=True, token_ids=True), model="nope")


async def test_sync_aleph_alpha_client_round_trip(api) -> None:
    def round_trip() -> str:
        client = aa.Client(token="dummy", host=api.base_url, total_retries=0)
        ids = client.tokenize(
            aa.TokenizationRequest(prompt=TEXT, tokens=False, token_ids=True), model=TINY_MODEL_NAME
        ).token_ids
        return client.detokenize(aa.DetokenizationRequest(token_ids=ids), model=TINY_MODEL_NAME).result

    assert await asyncio.to_thread(round_trip) == TEXT


async def test_model_is_required_once_several_are_served(http, embedder) -> None:
    response = await http.post("/tokenize", json={"prompt": TEXT})
    assert response.status_code == 400 and response.json()["error"]["param"] == "model"
