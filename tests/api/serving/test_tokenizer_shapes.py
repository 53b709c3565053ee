"""Which tokenizer API a body is, and the response shapers, with the real SmolLM2 tokenizer."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import TypeAdapter, ValidationError

from api.schemas.aleph import AlephDetokenizeRequest, AlephTokenizeRequest
from api.schemas.openai import ChatMessage
from api.schemas.tokenizer import AnyDetokenizeRequest, AnyTokenizeRequest, DetokenizeRequest, TokenizeRequest
from api.serving.chat import render_chat
from api.serving.tokenizer import aleph_tokens, seed_tokens, vllm_tokens

TOKENIZE = TypeAdapter(AnyTokenizeRequest)
DETOKENIZE = TypeAdapter(AnyDetokenizeRequest)


@pytest.fixture(scope="module")
def tokenizer(smollm2_tokenizer_dir: Path):
    from api.tokenizer_loading import load_tokenizer

    return load_tokenizer(smollm2_tokenizer_dir)  # the api's own (api/fast_tokenizer.py)


def test_the_body_picks_the_api() -> None:
    assert isinstance(
        TOKENIZE.validate_python({"model": "m", "prompt": "x", "tokens": True, "token_ids": False}),
        AlephTokenizeRequest,
    )
    assert isinstance(TOKENIZE.validate_python({"prompt": "x", "return_token_strs": True}), TokenizeRequest)
    assert isinstance(TOKENIZE.validate_python({"text": "x"}), TokenizeRequest)
    assert isinstance(TOKENIZE.validate_python({"messages": [{"role": "user", "content": "x"}]}), TokenizeRequest)
    assert isinstance(DETOKENIZE.validate_python({"model": "m", "token_ids": [1]}), AlephDetokenizeRequest)
    assert isinstance(DETOKENIZE.validate_python({"tokens": [1]}), DetokenizeRequest)


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"prompt": "a", "messages": [{"role": "user", "content": "b"}]},
        {"prompt": "x", "tokens": True},  # Aleph Alpha's needs a model
        {"prompt": "x", "tools": [{"type": "function"}]},
        [1, 2],
    ],
)
def test_bodies_that_fit_no_api_are_refused(body) -> None:
    with pytest.raises(ValidationError):
        TOKENIZE.validate_python(body)


def test_shapers(tokenizer) -> None:
    ids = tokenizer.encode("Hello world")
    assert vllm_tokens(tokenizer, ids, max_model_len=8, return_token_strs=True) == {
        "count": 2,
        "max_model_len": 8,
        "tokens": ids,
        "token_strs": ["Hello", "Ġworld"],
    }
    assert vllm_tokens(tokenizer, ids, max_model_len=8, return_token_strs=False)["token_strs"] is None
    assert seed_tokens(tokenizer, ids) == {"tokens": ids, "token_strings": ["Hello", " world"], "token_count": 2}
    assert aleph_tokens(tokenizer, ids, tokens=True, token_ids=False) == {"tokens": ["Hello", "Ġworld"]}
    assert aleph_tokens(tokenizer, ids, tokens=False, token_ids=True) == {"token_ids": ids}


def test_render_chat_equals_the_template_tokenized(tokenizer, smollm2_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer  # the reference (the api's own tokenizer does not use it)

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    reference = AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)
    expected = reference.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
    rendered = render_chat([ChatMessage(**m) for m in messages], tokenizer)
    assert rendered == list(expected)
    continued = render_chat(
        [ChatMessage(role="user", content="Hi"), ChatMessage(role="assistant", content="Hel")],
        tokenizer,
        continue_final_message=True,
    )
    assert tokenizer.decode(continued).endswith("Hel")
