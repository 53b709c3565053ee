"""Sampler semantics on hand-made logits (vLLM names and order), and batch-independent seeded randomness."""

from __future__ import annotations

import math
from collections import Counter

import numpy as np
import pytest
import torch

from contracts import LOGPROB_FLOOR
from engine_worker.constraints import MaskRow, PendingMasks
from engine_worker.sampler import Sampler
from engine_worker.sampling_rows import SamplingRow, row_uniform, seed_key

VOCAB = 8


@pytest.fixture
def sampler() -> Sampler:
    return Sampler(torch.device("cpu"))


def logits_of(*rows: list[float]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float32)


def draws(sampler: Sampler, logits: list[float], n: int = 2000, **params) -> Counter:
    """Sample one row `n` times with different positions (a fresh uniform each)."""
    rows = [SamplingRow(temperature=1.0, key=seed_key(42, 0), position=p, **params) for p in range(n)]
    return Counter(sampler(logits_of(*[logits] * n), rows).token_ids)


def test_greedy_is_exact_argmax(sampler) -> None:
    torch.manual_seed(0)
    logits = torch.randn(16, 1000)
    out = sampler(logits.clone(), [SamplingRow(temperature=0.0) for _ in range(16)])
    assert out.token_ids == logits.argmax(dim=-1).tolist()


def test_sampling_follows_the_distribution(sampler) -> None:
    probs = [0.5, 0.3, 0.2]
    counts = draws(sampler, [math.log(p) for p in probs] + [-math.inf] * (VOCAB - 3), n=4000)
    assert set(counts) <= {0, 1, 2}
    for token, p in enumerate(probs):
        assert abs(counts[token] / 4000 - p) < 0.04


def test_temperature_sharpens(sampler) -> None:
    logits = [math.log(p) for p in (0.5, 0.3, 0.2)] + [-math.inf] * (VOCAB - 3)
    counts = draws(sampler, [x / 1 for x in logits], n=2000)
    cold = Counter(
        sampler(
            logits_of(*[logits] * 2000),
            [SamplingRow(temperature=0.25, key=seed_key(42, 0), position=p) for p in range(2000)],
        ).token_ids
    )
    assert cold[0] > counts[0] + 400


def test_top_k_keeps_the_k_most_likely(sampler) -> None:
    logits = [3.0, 2.9, 2.8, 2.7, 0.0, 0.0, 0.0, 0.0]
    assert set(draws(sampler, logits, top_k=2)) == {0, 1}
    assert set(draws(sampler, logits, top_k=0)) > {0, 1, 2}


def test_top_p_keeps_the_smallest_set_covering_p(sampler) -> None:
    probs = [0.5, 0.3, 0.15, 0.05]
    logits = [math.log(p) for p in probs] + [-math.inf] * (VOCAB - 4)
    assert set(draws(sampler, logits, top_p=0.7)) == {0, 1}
    assert set(draws(sampler, logits, top_p=0.85)) == {0, 1, 2}
    assert set(draws(sampler, logits, top_p=0.1)) == {0}  # the most likely token always survives
    assert set(draws(sampler, logits, top_p=0.85, top_k=1)) == {0}


def test_min_p_drops_tokens_below_a_fraction_of_the_top(sampler) -> None:
    probs = [0.4, 0.3, 0.18, 0.12]
    logits = [math.log(p) for p in probs] + [-math.inf] * (VOCAB - 4)
    assert set(draws(sampler, logits, min_p=0.5)) == {0, 1}
    assert set(draws(sampler, logits, min_p=0.25)) == {0, 1, 2, 3}


def test_penalties_change_the_greedy_choice(sampler) -> None:
    logits = [2.0, 1.9, -1.0, -1.2, 0, 0, 0, 0]

    def pick(**params) -> int:
        return sampler(logits_of(logits), [SamplingRow(temperature=0.0, **params)]).token_ids[0]

    assert pick() == 0
    assert pick(frequency_penalty=0.2, output_ids=[0]) == 1  # 2.0 - 0.2 < 1.9
    assert pick(frequency_penalty=0.05, output_ids=[0]) == 0
    assert pick(frequency_penalty=0.05, output_ids=[0, 0, 0]) == 1  # counts multiply
    assert pick(presence_penalty=0.15, output_ids=[0, 0, 0]) == 1
    assert pick(presence_penalty=0.05, output_ids=[0, 0, 0]) == 0  # presence does not count
    # Repetition is multiplicative over prompt + output: positive logits shrink, negative ones grow.
    assert pick(repetition_penalty=1.1, context_ids=[0]) == 1
    assert pick(repetition_penalty=1.1, context_ids=[1]) == 0
    neg = [-1.0, -1.2, -5, -5, -5, -5, -5, -5]
    row = SamplingRow(temperature=0.0, repetition_penalty=1.5, context_ids=[0])
    assert sampler(logits_of(neg), [row]).token_ids == [1]  # -1.5 < -1.2


def test_logit_bias_and_suppression(sampler) -> None:
    logits = [5.0, 1.0, 0, 0, 0, 0, 0, 0]
    out = sampler(
        logits_of(logits, logits, logits),
        [
            SamplingRow(temperature=0.0, logit_bias={6: 10.0}),
            SamplingRow(temperature=0.0, suppress_ids=(0,)),
            SamplingRow(temperature=0.0),
        ],
    )
    assert out.token_ids == [6, 1, 0]
    assert 0 not in draws(sampler, logits, suppress_ids=(0,), n=300)


def test_seeded_rows_ignore_batch_mates_and_row_order(sampler) -> None:
    torch.manual_seed(1)
    logits = torch.randn(6, 500)
    rows = [SamplingRow(temperature=1.0, key=seed_key(s, 0), position=10 + s) for s in range(6)]
    together = sampler(logits.clone(), rows).token_ids
    alone = [sampler(logits[i : i + 1].clone(), [rows[i]]).token_ids[0] for i in range(6)]
    reversed_ids = sampler(logits.flip(0).clone(), rows[::-1]).token_ids[::-1]
    mixed = sampler(
        torch.cat([logits, torch.randn(3, 500)]),
        rows + [SamplingRow(temperature=0.7, top_p=0.5, key=seed_key(99, 1), position=3)] * 3,
    ).token_ids[:6]
    assert together == alone == reversed_ids == mixed


def test_randomness_is_keyed_by_seed_choice_and_position() -> None:
    assert row_uniform(seed_key(1, 0), 5) == row_uniform(seed_key(1, 0), 5)
    values = {row_uniform(seed_key(s, c), p) for s in (1, 2) for c in (0, 1) for p in (5, 6)}
    assert len(values) == 8 and all(0.0 <= v < 1.0 for v in values)


def test_logprobs_are_raw_and_clamped(sampler) -> None:
    logits = [2.0, 1.0, 0.5, -math.inf, 0, 0, 0, 0]
    row = SamplingRow(temperature=0.0, num_logprobs=8, repetition_penalty=2.0, context_ids=[0], logit_bias={7: 50})
    out = sampler(logits_of(logits), [row])
    raw = torch.log_softmax(logits_of(logits), dim=-1)[0]
    assert out.token_ids == [7]
    data = out.logprobs[0]
    assert data.logprob == pytest.approx(raw[7].item())  # before bias and penalty
    assert data.rank == int((raw > raw[7]).sum()) + 1
    assert data.top_ids[:3] == [0, 1, 2]
    assert data.top_logprobs[:3] == pytest.approx(raw[:3].tolist())
    assert data.top_ids[-1] == 3 and data.top_logprobs[-1] == LOGPROB_FLOOR
    zero = sampler(logits_of(logits), [SamplingRow(temperature=0.0, num_logprobs=0)]).logprobs[0]
    assert zero.top_ids == [] and zero.rank == 1
    assert sampler(logits_of(logits), [SamplingRow(temperature=0.0)]).logprobs == [None]


def _nucleus(logits: torch.Tensor, top_p: float) -> set[int]:
    """vLLM's definition: sort ascending, drop tokens while the cumulative mass is <= 1 - top_p."""
    probs_sorted, order = torch.softmax(logits, dim=-1).sort()
    drop = probs_sorted.cumsum(dim=-1) <= 1 - top_p
    drop[-1] = False
    return set(order[~drop].tolist())


@pytest.mark.parametrize("flat", [False, True], ids=["peaked", "flat-beyond-candidates"])
def test_top_p_on_a_large_vocabulary_matches_the_sorted_definition(sampler, flat) -> None:
    torch.manual_seed(3)
    logits = torch.randn(2000) * (0.05 if flat else 3.0)
    nucleus = _nucleus(logits, 0.8)
    rows = [SamplingRow(temperature=1.0, top_p=0.8, key=seed_key(1, 0), position=p) for p in range(3000)]
    seen = set(sampler(logits.expand(3000, -1).clone(), rows).token_ids)
    assert seen <= nucleus
    assert len(seen) > (256 if flat else 0.8 * len(nucleus))


@pytest.mark.parametrize("masked_rows", [(0, 1, 2), (1,)], ids=["all rows", "one row"])
def test_token_masks_leave_only_allowed_tokens(sampler, masked_rows) -> None:
    """Row r allows only tokens 3 and 40 + r; the best logit is elsewhere, so greedy takes the best allowed one and
    sampling never leaves the allowed pair. Unmasked rows are untouched."""
    vocab = 70
    logits = torch.arange(vocab, dtype=torch.float32).repeat(3, 1)  # token 69 is everyone's favourite
    allowed = np.zeros((3, 96), dtype=bool)  # 3 words of 32 bits per row
    for r in range(3):
        allowed[r, [3, 40 + r]] = True
    masks = PendingMasks(np.packbits(allowed, axis=-1, bitorder="little").view(np.int32), vocab)
    greedy = [SamplingRow(allowed=MaskRow(masks, r) if r in masked_rows else None) for r in range(3)]
    assert sampler(logits.clone(), greedy).token_ids == [40 + r if r in masked_rows else 69 for r in range(3)]
    hot = [
        SamplingRow(temperature=100.0, key=7, position=p, allowed=MaskRow(masks, r)) for p, r in enumerate([0, 1, 2])
    ]
    assert all(token in (3, 40 + r) for r, token in enumerate(sampler(logits.clone(), hot).token_ids))
