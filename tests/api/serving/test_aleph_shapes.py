"""Aleph Alpha request mapping and response shapes, without a server."""

from __future__ import annotations

from pathlib import Path

import aleph_alpha_client as aa
import pytest
from pydantic import ValidationError

from api.schemas.aleph import AlephCompleteRequest
from api.serving.aleph import finish_reason, log_probs_body, prompt_token_ids
from contracts import TokenLogprob, TopLogprob


def client_body(**fields) -> dict:
    """The body the real client sends for these CompletionRequest fields."""
    return {**aa.CompletionRequest(prompt=aa.Prompt.from_text("Hi"), **fields).to_json(), "model": "m"}


def test_client_defaults_mean_greedy_decoding() -> None:
    sampling = AlephCompleteRequest.model_validate(client_body(maximum_tokens=7)).sampling()
    assert sampling.greedy and sampling.top_k == 0 and sampling.top_p == 1.0 and sampling.max_tokens == 7
    assert sampling.presence_penalty == 0 and sampling.logprobs is None and sampling.prompt_logprobs is None


def test_top_k_or_top_p_alone_sample_at_temperature_one() -> None:
    assert AlephCompleteRequest.model_validate(client_body(top_k=5)).sampling().temperature == 1.0
    assert AlephCompleteRequest.model_validate(client_body(top_p=0.9)).sampling().top_p == 0.9
    assert AlephCompleteRequest.model_validate(client_body(temperature=0.3)).sampling().temperature == 0.3
    assert AlephCompleteRequest.model_validate(client_body(top_k=1)).sampling().greedy


def test_fields_map_onto_sampling_params() -> None:
    body = AlephCompleteRequest.model_validate(
        client_body(
            maximum_tokens=9,
            minimum_tokens=2,
            presence_penalty=0.5,
            frequency_penalty=0.25,
            n=2,
            best_of=3,
            logit_bias={42: -3.0},
            log_probs=1,
            stop_sequences=["\n"],
            echo=True,
        )
    )
    sampling = body.sampling()
    assert (sampling.min_tokens, sampling.n, sampling.best_of, sampling.logit_bias) == (2, 2, 3, {42: -3.0})
    assert (sampling.presence_penalty, sampling.frequency_penalty, sampling.stop) == (0.5, 0.25, ["\n"])
    assert sampling.logprobs == 1 and sampling.prompt_logprobs == 1  # echo shows the prompt's log_probs too


def test_penalties_that_count_nothing_are_off() -> None:
    body = client_body(presence_penalty=0.5, repetition_penalties_include_completion=False)
    assert AlephCompleteRequest.model_validate(body).sampling().presence_penalty == 0.0


@pytest.mark.parametrize(
    ("fields", "needle"),
    [
        ({"sequence_penalty": 0.3}, "sequence_penalty"),
        ({"frequency_penalty": 0.3, "use_multiplicative_frequency_penalty": True}, "multiplicative"),
        ({"presence_penalty": 0.3, "penalty_exceptions": ["\n"]}, "penalty_exceptions"),
        ({"completion_bias_exclusion": ["no"]}, "completion_bias"),
        ({"steering_concepts": ["x"]}, "steering_concepts"),
    ],
)
def test_what_would_change_the_result_is_refused(fields: dict, needle: str) -> None:
    with pytest.raises(ValidationError, match=needle):
        AlephCompleteRequest.model_validate(client_body(**fields))


def test_harmless_defaults_and_unknown_fields_pass() -> None:
    # multiplicative flags without a penalty, disable_optimizations, hosting and a future field change nothing
    AlephCompleteRequest.model_validate(
        {
            **client_body(use_multiplicative_presence_penalty=True, disable_optimizations=True),
            "hosting": "aleph-alpha",
            "some_future_flag": True,
        }
    )


def test_prompt_items() -> None:
    with pytest.raises(ValidationError, match="image"):
        AlephCompleteRequest(model="m", prompt=[{"type": "image", "data": "aGk="}])
    with pytest.raises(ValidationError, match="controls"):
        AlephCompleteRequest(model="m", prompt=[{"type": "text", "data": "x", "controls": [{"start": 0}]}])
    with pytest.raises(ValidationError, match="best_of"):
        AlephCompleteRequest(model="m", prompt="x", best_of=2, stream=True)


def test_prompt_token_ids_join_text_and_token_items(smollm2_tokenizer_dir: Path) -> None:
    from api.tokenizer_loading import load_tokenizer

    tokenizer = load_tokenizer(smollm2_tokenizer_dir)
    body = AlephCompleteRequest(
        model="m",
        prompt=[
            {"type": "text", "data": "Hello"},
            {"type": "token_ids", "data": [7, 8]},
            {"type": "text", "data": " world"},
        ],
    )
    assert prompt_token_ids(body.prompt, tokenizer) == [
        *tokenizer.encode("Hello"),
        7,
        8,
        *tokenizer.encode(" world", add_special_tokens=False),
    ]
    assert prompt_token_ids("Hello", tokenizer) == tokenizer.encode("Hello")


def test_finish_reason_vocabulary() -> None:
    assert finish_reason("length", None) == "maximum_tokens"
    assert finish_reason("stop", None) == "end_of_text"
    assert finish_reason("stop", "###") == "stop_sequence_reached"


def test_log_probs_body_lists_the_chosen_token_and_alternatives() -> None:
    entry = TokenLogprob(
        token_id=5,
        token=" a",
        logprob=-0.5,
        top=[
            TopLogprob(token_id=5, token=" a", logprob=-0.5),
            TopLogprob(token_id=6, token=" b", logprob=float("-inf")),
        ],
    )
    assert log_probs_body([None, entry], unscored_token="Hi") == [{"Hi": None}, {" a": -0.5, " b": -9999.0}]
