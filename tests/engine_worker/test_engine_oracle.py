"""The correctness oracle: greedy output for any mix of concurrent requests equals transformers `generate()`
greedy output for each request alone, token for token (tiny fp32 model), whatever the batching, chunking
and preemption; logprobs equal a plain HF forward pass's log-softmax."""

from __future__ import annotations

import pytest
import torch

from tests.engine_worker.conftest import (
    ScriptedProposer,
    make_request,
    prompt_of,
    record_steps,
    run_to_completion,
    run_workload,
    tokens_by_choice,
)

# (prompt length, max_tokens, step at which it is added)
# The first four grow past 128 tokens together, which a 512-token cache cannot hold: preemption.
WORKLOAD = [(5, 130, 0), (20, 120, 0), (12, 125, 1), (30, 100, 2), (90, 20, 3), (9, 38, 7), (130, 16, 12)]


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({}, id="roomy"),
        pytest.param({"max_num_batched_tokens": 16}, id="chunked-prefill"),
        pytest.param({"max_num_batched_tokens": 32, "kv_cache_tokens": 512}, id="preemption"),
        pytest.param({"max_num_seqs": 3, "max_num_batched_tokens": 7}, id="three-slots-tiny-budget"),
    ],
)
def test_greedy_matches_transformers_for_a_concurrent_mix(engine_factory, hf_greedy, config) -> None:
    engine = engine_factory(**config)
    steps = record_steps(engine)
    got = run_workload(engine, WORKLOAD)
    for i, (length, max_tokens, _) in enumerate(WORKLOAD):
        expected = hf_greedy(prompt_of(length, i), max_tokens)
        assert got[f"r{i}"] == expected, f"request r{i} diverged from transformers"

    budget = engine.config.max_num_batched_tokens
    assert all(out.num_tokens <= budget for out in steps)
    assert all(len(out.scheduled) <= engine.config.max_num_seqs for out in steps)
    if "max_num_batched_tokens" in config:
        # Prompts longer than the budget were split, and chunks ran in the same steps as decodes.
        mixed = [out for out in steps if any(n == 1 for _, n in out.scheduled) and any(n > 1 for _, n in out.scheduled)]
        assert mixed, "no step mixed a prefill chunk with decodes"
    if "kv_cache_tokens" in config:
        assert engine.stats().preemptions > 0
    assert engine.kv.num_running == 0 and not engine.scheduler.running


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({}, id="roomy"),
        pytest.param({"max_num_batched_tokens": 16}, id="chunked-prefill"),
        pytest.param({"max_num_batched_tokens": 32, "kv_cache_tokens": 512}, id="preemption"),
    ],
)
def test_greedy_with_draft_tokens_matches_transformers(engine_factory, tiny_model_dir, hf_greedy, config) -> None:
    """Speculative decoding changes how many tokens a step yields, never which: with drafts that are right
    three times in four, every request still equals transformers alone, and rejected drafts leave no KV behind."""
    from engine_worker.engine import Engine, EngineConfig

    answers = {
        (tuple(prompt_of(length, i)), 0): hf_greedy(prompt_of(length, i), max_tokens)
        for i, (length, max_tokens, _) in enumerate(WORKLOAD)
    }
    proposer = ScriptedProposer(answers)
    base = engine_factory(**config)
    engine = Engine(
        EngineConfig(**{**_config_of(base), "speculative_max_rows": 64}),
        base.tokenizer,
        base.runner,
        base.eos_token_ids,
        proposer=proposer,
    )
    steps = record_steps(engine)
    got = run_workload(engine, WORKLOAD)
    for i, (length, _, _) in enumerate(WORKLOAD):
        assert got[f"r{i}"] == answers[(tuple(prompt_of(length, i)), 0)], f"request r{i} diverged"

    assert 0 < engine.num_accepted_tokens_total < engine.num_draft_tokens_total
    # Drafts ran alongside other decodes and prefill chunks, within the token budget.
    checked = [out for out in steps if any(n > 1 and s.num_output_tokens > 0 for s, n in out.scheduled)]
    assert len(checked) > 10
    assert all(out.num_tokens <= engine.config.max_num_batched_tokens for out in steps)
    assert len(steps) < sum(max_tokens for _, max_tokens, _ in WORKLOAD) // 2  # fewer steps than tokens
    if "kv_cache_tokens" in config:
        assert engine.stats().preemptions > 0
    assert engine.kv.num_running == 0 and not engine.scheduler.running


def _config_of(engine) -> dict:
    from dataclasses import asdict

    return asdict(engine.config)


def test_min_tokens_matches_transformers_min_new_tokens(engine_factory, hf_model) -> None:
    engine = engine_factory()
    prompt = prompt_of(12, 5)
    eos = engine.tokenizer.eos_token_id
    # Make EOS the greedy choice everywhere so min_tokens is what decides the length.
    engine.add_request(make_request("a", prompt, temperature=0.0, max_tokens=30, min_tokens=6, logit_bias={eos: 100.0}))
    outputs = run_to_completion(engine)["a"]
    tokens = tokens_by_choice(outputs)[0]
    assert len(tokens) == 7 and tokens[-1] == eos and eos not in tokens[:-1]
    assert outputs[-1].choices[-1].finish_reason == "stop" and outputs[-1].choices[-1].stop_reason is None


def test_logprobs_equal_hf_log_softmax(engine_factory, hf_model) -> None:
    engine = engine_factory()
    prompt = prompt_of(20, 3)
    engine.add_request(
        make_request("lp", prompt, temperature=0.0, max_tokens=12, logprobs=5, prompt_logprobs=3, ignore_eos=True)
    )
    outputs = run_to_completion(engine)["lp"]
    generated = [lp for out in outputs for c in out.choices for lp in (c.logprobs or [])]
    tokens = tokens_by_choice(outputs)[0]
    assert [lp.token_id for lp in generated] == tokens and len(tokens) == 12

    with torch.no_grad():
        logits = hf_model(torch.tensor([prompt + tokens])).logits[0]
    reference = torch.log_softmax(logits.float(), dim=-1)
    for i, lp in enumerate(generated):
        row = reference[len(prompt) - 1 + i]
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert lp.rank == 1  # greedy picks the top token
        top = torch.topk(row, 5)
        assert [t.token_id for t in lp.top] == top.indices.tolist()
        assert [t.logprob for t in lp.top] == pytest.approx(top.values.tolist(), abs=1e-4)

    prompt_lps = outputs[0].prompt_logprobs
    assert prompt_lps is not None and len(prompt_lps) == len(prompt) and prompt_lps[0] is None
    assert all(out.prompt_logprobs is None for out in outputs[1:])
    for i in range(1, len(prompt)):
        entry, row = prompt_lps[i], reference[i - 1]
        assert entry.token_id == prompt[i]
        assert entry.logprob == pytest.approx(row[prompt[i]].item(), abs=1e-4)
        assert entry.rank == int((row > row[prompt[i]]).sum()) + 1
        assert [t.token_id for t in entry.top] == torch.topk(row, 3).indices.tolist()


def test_prompt_logprobs_survive_chunking_and_preemption(engine_factory, hf_model) -> None:
    engine = engine_factory(max_num_batched_tokens=16, kv_cache_tokens=512, max_num_seqs=4)
    prompt = prompt_of(70, 8)
    engine.add_request(make_request("p", prompt, temperature=0.0, max_tokens=4, prompt_logprobs=0))
    for i in range(3):  # neighbours that force preemptions while "p" prefills
        engine.add_request(make_request(f"n{i}", prompt_of(100, i), temperature=0.0, max_tokens=60))
    outputs = run_to_completion(engine)["p"]
    with torch.no_grad():
        reference = torch.log_softmax(hf_model(torch.tensor([prompt])).logits[0].float(), dim=-1)
    prompt_lps = outputs[0].prompt_logprobs
    assert prompt_lps is not None and len(prompt_lps) == len(prompt)
    for i in range(1, len(prompt)):
        assert prompt_lps[i].logprob == pytest.approx(reference[i - 1, prompt[i]].item(), abs=1e-4)
        assert prompt_lps[i].top == []


@pytest.mark.parametrize("budget", [512, 16])
def test_choices_copy_the_prompt_kv_of_choice_zero(engine_factory, hf_greedy, budget) -> None:
    engine = engine_factory(max_num_batched_tokens=budget)
    steps = record_steps(engine)
    prompt = prompt_of(45, 2)
    engine.add_request(make_request("n", prompt, temperature=0.0, n=3, max_tokens=20))
    by_choice = tokens_by_choice(run_to_completion(engine)["n"])
    expected = hf_greedy(prompt, 20)
    assert by_choice == {0: expected, 1: expected, 2: expected}
    # Choices 1 and 2 computed only the last prompt token themselves.
    assert sum(n for out in steps for seq, n in out.scheduled if seq.index > 0) == 2 * (1 + 19)
    assert sum(len(out.forks) for out in steps) == 2
