"""Speculative decoding: the n-gram proposer on its own, and the engine's verification, which must produce
exactly what decoding one token at a time produces, whatever the sampling parameters."""

from __future__ import annotations

import random
from dataclasses import asdict

import pytest

from engine_worker.engine import Engine, EngineConfig
from engine_worker.speculative import NgramIndex, NgramProposer
from tests.engine_worker.conftest import ScriptedProposer, make_request, prompt_of, run_to_completion


def _propose(tokens: list[int], limit: int = 8, *, num_tokens: int = 8, min_n: int = 2, max_n: int = 4) -> list[int]:
    return NgramProposer(num_tokens, min_n, max_n).propose_from(tokens, NgramIndex(), limit)


def test_proposes_what_followed_the_latest_occurrence_of_the_suffix() -> None:
    tokens = [1, 2, 3, 9, 1, 2, 3, 8, 5, 1, 2, 3]
    assert _propose(tokens, 2) == [8, 5]  # the occurrence at 4, not the one at 0


def test_longer_matches_win_over_more_recent_shorter_ones() -> None:
    tokens = [7, 1, 2, 9, 6, 5, 1, 2, 8, 7, 1, 2]
    assert _propose(tokens, 1) == [9]  # [7, 1, 2] matched at 0; [1, 2] alone would say 8
    assert _propose(tokens, 1, max_n=2) == [8]


def test_a_repeating_pattern_continues_past_the_end() -> None:
    assert _propose([3, 4, 4, 4, 4], 5) == [4, 4, 4, 4, 4]
    assert _propose([9, 1, 2, 1, 2, 1, 2], 5) == [1, 2, 1, 2, 1]


def test_no_proposal_for_novel_text_or_a_match_shorter_than_min_n() -> None:
    assert _propose(list(range(50))) == []
    assert _propose([5, 6, 7, 5, 8, 9, 5]) == []  # only the 1-gram [5] occurred before
    assert _propose([5, 6, 7, 5, 8, 9, 5], min_n=1) == [8, 9, 5, 8, 9, 5, 8, 9]  # the latest [5], looped
    assert _propose([1, 2, 3, 1, 2], limit=0) == []


def test_caps_at_num_tokens_and_limit() -> None:
    tokens = [1, 2] + list(range(10, 30)) + [1, 2]
    assert _propose(tokens, 100, num_tokens=3) == [10, 11, 12]
    assert _propose(tokens, 2, num_tokens=3) == [10, 11]


def test_an_index_grown_token_by_token_agrees_with_a_fresh_one() -> None:
    rng = random.Random(7)
    tokens = [rng.randrange(4) for _ in range(300)]
    proposer, grown = NgramProposer(5, 2, 4), NgramIndex()
    for end in range(1, len(tokens) + 1, rng.choice((1, 3))):
        prefix = tokens[:end]
        assert proposer.propose_from(prefix, grown, 5) == proposer.propose_from(prefix, NgramIndex(), 5)


def test_invalid_settings_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_tokens"):
        NgramProposer(0, 1, 2)
    with pytest.raises(ValueError, match="min_n"):
        NgramProposer(3, 3, 2)
    with pytest.raises(ValueError, match="prompt_lookup_min"):
        EngineConfig(prompt_lookup_min=5, prompt_lookup_max=4)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        EngineConfig(num_speculative_tokens=-1)


# --- the engine: drafts never change the output ----------------------------------------------------------------
REQUESTS = [
    # seeded sampling with every kind of parameter that looks at the tokens generated so far
    {
        "temperature": 0.9,
        "top_p": 0.9,
        "seed": 11,
        "max_tokens": 40,
        "repetition_penalty": 1.3,
        "frequency_penalty": 0.5,
        "presence_penalty": 0.4,
        "ignore_eos": True,
    },
    {
        "temperature": 0.8,
        "top_k": 50,
        "min_p": 0.05,
        "seed": 5,
        "max_tokens": 30,
        "logprobs": 3,
        "n": 2,
        "ignore_eos": True,
    },
    {"temperature": 0.0, "max_tokens": 35, "min_tokens": 20, "logprobs": 0},
    {"temperature": 0.7, "seed": 3, "max_tokens": 50, "best_of": 3, "ignore_eos": True},
]


def _requests() -> list[tuple[str, list[int], dict]]:
    return [(f"s{i}", prompt_of(8 + 5 * i, 40 + i), params) for i, params in enumerate(REQUESTS)]


def _run(engine: Engine) -> dict[str, list]:
    for request_id, prompt, params in _requests():
        engine.add_request(make_request(request_id, prompt, **params))
    return run_to_completion(engine)


def _choices(outputs: list) -> dict[int, dict]:
    merged: dict[int, dict] = {}
    for output in outputs:
        for choice in output.choices:
            entry = merged.setdefault(choice.index, {"tokens": [], "text": "", "logprobs": [], "finish": None})
            entry["tokens"] += choice.token_ids
            entry["text"] += choice.text
            # A draft row's logits come from a chunk forward, a decode row's from a single-row one: fp32 agrees
            # to ~1e-5, so compare logprobs to 3 decimals.
            entry["logprobs"] += [
                (lp.token_id, pytest.approx(lp.logprob, abs=1e-3), [t.token_id for t in lp.top])
                for lp in choice.logprobs or []
            ]
            entry["finish"] = choice.finish_reason or entry["finish"]
    return merged


def test_seeded_sampling_penalties_logprobs_and_choices_are_unchanged_by_drafts(engine_factory) -> None:
    plain = engine_factory(max_num_seqs=16, num_speculative_tokens=0)
    expected = {rid: _choices(outs) for rid, outs in _run(plain).items()}
    answers = {}
    for request_id, prompt, _ in _requests():
        for index, choice in expected[request_id].items():
            answers[(tuple(prompt), index)] = choice["tokens"]
    proposer = ScriptedProposer(answers, wrong_every=3)
    drafted = Engine(
        EngineConfig(**{**asdict(plain.config), "speculative_max_rows": 64}),
        plain.tokenizer,
        plain.runner,
        plain.eos_token_ids,
        proposer=proposer,
    )
    got = {rid: _choices(outs) for rid, outs in _run(drafted).items()}
    assert got == expected
    assert drafted.num_accepted_tokens_total > 50
    assert drafted.num_draft_tokens_total > drafted.num_accepted_tokens_total
    assert expected["s2"][0]["finish"] == "length" and len(expected["s2"][0]["tokens"]) == 35


def test_stop_strings_and_max_tokens_end_a_step_that_accepted_drafts(engine_factory, tiny_tokenizer) -> None:
    plain = engine_factory(num_speculative_tokens=0)
    prompt = prompt_of(10, 3)
    plain.add_request(make_request("full", prompt, temperature=0.0, max_tokens=40, ignore_eos=True))
    full = run_to_completion(plain)["full"]
    tokens = [t for out in full for c in out.choices for t in c.token_ids]
    stop = tiny_tokenizer.decode(tokens[20:22])
    answers = {(tuple(prompt), 0): tokens}

    for params, expect in (
        ({"stop": [stop]}, "stop"),
        ({"max_tokens": 23}, "length"),
        ({"stop_token_ids": [tokens[17]]}, "stop"),
    ):
        engine = Engine(
            EngineConfig(**asdict(plain.config)),
            plain.tokenizer,
            plain.runner,
            plain.eos_token_ids,
            proposer=ScriptedProposer(answers, wrong_every=100, max_tokens=8),
        )
        engine.add_request(make_request("r", prompt, temperature=0.0, ignore_eos=True, **{"max_tokens": 40, **params}))
        with_drafts = _choices(run_to_completion(engine)["r"])[0]
        plain.add_request(make_request("r", prompt, temperature=0.0, ignore_eos=True, **{"max_tokens": 40, **params}))
        alone = _choices(run_to_completion(plain)["r"])[0]
        assert with_drafts == alone and alone["finish"] == expect, params
        assert engine.num_accepted_tokens_total >= 8  # whole drafts were accepted
        assert engine.kv.num_running == 0


def test_speculation_fades_out_as_the_batch_grows(engine_factory) -> None:
    proposer = ScriptedProposer({})
    base = engine_factory(max_num_seqs=8)
    engine = Engine(
        EngineConfig(**{**asdict(base.config), "speculative_max_rows": 10}),
        base.tokenizer,
        base.runner,
        base.eos_token_ids,
        proposer=proposer,
    )
    for i in range(1, 9):
        proposer.limits.clear()
        engine.add_request(make_request(f"r{i}", prompt_of(6, i), temperature=0.0, max_tokens=200, ignore_eos=True))
        engine.step()  # the new request's prompt
        proposer.limits.clear()
        engine.step()
        engine.step()
        allowed = 10 // i - 1
        assert proposer.limits == ([allowed] * 2 * i if allowed > 0 else []), i  # not asked when none is allowed


class _WrongProposer:
    """Always guesses a token the model never picks (the vocabulary's last one, a special token)."""

    def __init__(self, token: int) -> None:
        self.token, self.calls = token, 0

    def propose(self, seq, limit: int) -> list[int]:
        self.calls += 1
        return [self.token] * limit


def test_drafts_that_keep_missing_back_off(engine_factory) -> None:
    plain = engine_factory(num_speculative_tokens=0)
    plain.add_request(make_request("r", prompt_of(7, 9), temperature=0.0, max_tokens=120, ignore_eos=True))
    expected = _choices(run_to_completion(plain)["r"])
    proposer = _WrongProposer(plain.runner.vocab_size - 1)
    engine = Engine(
        EngineConfig(**asdict(plain.config)), plain.tokenizer, plain.runner, plain.eos_token_ids, proposer=proposer
    )
    engine.add_request(make_request("r", prompt_of(7, 9), temperature=0.0, max_tokens=120, ignore_eos=True))
    assert _choices(run_to_completion(engine)["r"]) == expected
    # Guesses after pauses of 0, 1, 2, 4, 8, 16, 32, 32 tokens: a handful of the 119 decode steps.
    assert engine.num_accepted_tokens_total == 0
    assert 6 <= proposer.calls <= 10
