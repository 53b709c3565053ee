from __future__ import annotations

import pytest
from pydantic import ValidationError

from api.schemas.openai import ChatCompletionRequest, CompletionRequest


def test_completion_request_maps_vllm_extras_onto_sampling() -> None:
    body = CompletionRequest(
        model="m",
        prompt="hi",
        max_tokens=5,
        temperature=0.2,
        top_k=7,
        min_p=0.1,
        repetition_penalty=1.2,
        stop="END",
        stop_token_ids=[3],
        ignore_eos=True,
        min_tokens=2,
        seed=9,
        logit_bias={"42": -5},
        logprobs=2,
    )
    sampling = body.sampling(max_tokens=body.max_tokens, logprobs=body.logprobs, best_of=body.best_of)
    assert sampling.max_tokens == 5 and sampling.temperature == 0.2 and sampling.top_k == 7
    assert sampling.stop == ["END"] and sampling.stop_token_ids == [3] and sampling.ignore_eos
    assert sampling.logit_bias == {42: -5.0} and sampling.logprobs == 2 and sampling.seed == 9


def test_omitted_fields_take_the_contract_defaults() -> None:
    sampling = CompletionRequest(model="m", prompt="hi").sampling(max_tokens=16, logprobs=None)
    assert sampling.temperature == 1.0 and sampling.top_p == 1.0 and sampling.n == 1


def test_unknown_harmless_fields_are_accepted() -> None:
    CompletionRequest(model="m", prompt="hi", metadata={"a": 1}, store=False)


@pytest.mark.parametrize("field", ["tools", "guided_json", "use_beam_search"])
def test_semantic_fields_we_do_not_implement_are_refused(field: str) -> None:
    with pytest.raises(ValidationError, match=field):
        CompletionRequest(model="m", prompt="hi", **{field: [{"x": 1}] if field == "tools" else True})


def test_a_deprecated_guided_field_names_its_replacement() -> None:
    with pytest.raises(ValidationError, match=r"guided_regex: removed in vLLM; use structured_outputs: \{\"regex\""):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], guided_regex="a+")


def test_chat_token_limit_prefers_max_completion_tokens() -> None:
    body = ChatCompletionRequest(
        model="m", messages=[{"role": "user", "content": "x"}], max_tokens=5, max_completion_tokens=7
    )
    assert body.token_limit == 7


def test_chat_content_parts_are_joined_and_images_refused() -> None:
    body = ChatCompletionRequest(
        model="m",
        messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}],
    )
    assert body.messages[0].text() == "ab"
    with pytest.raises(ValidationError):
        ChatCompletionRequest(
            model="m", messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]
        )


def test_top_logprobs_without_logprobs_is_refused() -> None:
    with pytest.raises(ValidationError, match="top_logprobs"):
        ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], top_logprobs=3)
    body = ChatCompletionRequest(model="m", messages=[{"role": "user", "content": "x"}], logprobs=True)
    assert body.logprobs_count == 0
