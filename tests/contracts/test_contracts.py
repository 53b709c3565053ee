from __future__ import annotations

import pytest
from pydantic import ValidationError

from contracts import (
    Accepted,
    ChoiceDelta,
    End,
    FinishReason,
    GenerateRequest,
    SamplingParams,
    Tokens,
    Usage,
    parse_event,
)


def test_request_round_trips_through_json() -> None:
    request = GenerateRequest(
        request_id="r-1",
        model="m/x.y",
        prompt_token_ids=[1, 2, 3],
        sampling=SamplingParams(temperature=0.5, stop=["\n"], seed=7),
        reply_subject="inf.tok.e.r-1",
        deadline=1.5e9,
    )
    assert GenerateRequest.from_bytes(request.to_bytes()) == request


def test_unknown_fields_are_rejected_not_dropped() -> None:
    with pytest.raises(ValidationError):
        GenerateRequest.from_bytes(
            b'{"request_id":"a","model":"m","prompt_token_ids":[1],"reply_subject":"s","temprature":0}'
        )


@pytest.mark.parametrize(
    "fields",
    [
        {"temperature": -0.1},
        {"temperature": 2.5},
        {"top_p": 0.0},
        {"top_k": -2},
        {"max_tokens": 0},
        {"n": 2, "best_of": 1},
        {"min_tokens": 5, "max_tokens": 4},
        {"logit_bias": {5: 101.0}},
        {"logit_bias": {-1: 1.0}},
        {"stop": [""]},
        {"stop": ["x"] * 65},
        {"logprobs": 21},
        {"seed": 2**63},
    ],
)
def test_sampling_bounds(fields: dict) -> None:
    with pytest.raises(ValidationError):
        SamplingParams(**fields)


def test_sampling_derived_properties() -> None:
    assert SamplingParams(temperature=0).greedy
    assert SamplingParams(n=2, best_of=5).num_candidates == 5
    assert SamplingParams(n=3).num_candidates == 3


def test_events_parse_to_their_kind() -> None:
    events = [
        Accepted(request_id="r", seq=0, worker_id="w"),
        Tokens(request_id="r", seq=1, choices=[ChoiceDelta(text="hé", token_ids=[5])]),
        End(request_id="r", seq=2, usage=Usage(prompt_tokens=3, completion_tokens=1)),
    ]
    parsed = [parse_event(event.to_bytes()) for event in events]
    assert parsed == events
    assert parsed[2].usage.total_tokens == 4
    assert ChoiceDelta(finish_reason="stop").finish_reason is FinishReason.STOP
