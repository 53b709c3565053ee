"""The correctness oracle for the generic model path, per architecture (tests/model_fixtures.py
TINY_ARCHITECTURES; docs/models.md is generated from that table): a mix of concurrent greedy requests under
chunked prefill and preemption equals transformers `generate()` for each request alone, token for token (fp32);
with draft tokens and several choices too; logprobs and prompt logprobs equal a plain forward pass; embeddings
equal `output_hidden_states`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from engine_worker.engine import Engine, EngineConfig
from tests.engine_worker.conftest import (
    ScriptedProposer,
    make_request,
    prompt_of,
    record_steps,
    run_to_completion,
    run_workload,
    tokens_by_choice,
)
from tests.model_fixtures import TINY_ARCHITECTURES, build_tiny_model

# (prompt length, max_tokens, step at which it is added). With a 128-token context and a 256-token cache, four
# sequences fit while they are short and two once they pass 64 tokens: preemption; the 90-token prompt is
# chunked by the 16-token budget. Lengths pass every sliding window of the table (8 and 16).
WORKLOAD = [(5, 70, 0), (20, 60, 0), (12, 64, 1), (30, 40, 2), (90, 12, 3), (9, 30, 6)]
TIGHT = {"max_model_len": 128, "kv_cache_tokens": 256, "max_num_batched_tokens": 16, "max_num_seqs": 4}


class _Oracle:
    """One architecture: its tiny model directory, transformers' model, and generate() results (cached)."""

    def __init__(self, model_dir: Path) -> None:
        from transformers import AutoModelForCausalLM

        self.model_dir = model_dir
        self.hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        self._greedy: dict[tuple, list[int]] = {}

    def greedy(self, prompt: list[int], max_new_tokens: int) -> list[int]:
        key = (tuple(prompt), max_new_tokens)
        if key not in self._greedy:
            with torch.no_grad():
                out = self.hf.generate(
                    torch.tensor([prompt]),
                    do_sample=False,
                    max_new_tokens=max_new_tokens,
                    min_new_tokens=max_new_tokens,
                )
            self._greedy[key] = out[0, len(prompt) :].tolist()
        return self._greedy[key]

    def engine(self, proposer: Any = None, **overrides: Any) -> Engine:
        config = EngineConfig(
            **{
                "dtype": "float32",
                "device": "cpu",
                "torch_threads": 1,
                "model_impl": "generic",
                "num_speculative_tokens": 0,
                **overrides,
            }
        )
        base = Engine.from_pretrained(self.model_dir, config)
        if proposer is None:
            return base
        return Engine(config, base.tokenizer, base.runner, base.eos_token_ids, proposer=proposer)


# Two architectures run in the quick suite (sliding-window layers, q/k norms, odd head_dim); all in the slow one.
QUICK = {"gemma3", "qwen3"}


@pytest.fixture(
    scope="module",
    params=[pytest.param(name, marks=() if name in QUICK else pytest.mark.slow) for name in sorted(TINY_ARCHITECTURES)],
)
def oracle(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, smollm2_tokenizer_dir: Path):
    return _Oracle(build_tiny_model(request.param, tmp_path_factory.mktemp(request.param), smollm2_tokenizer_dir))


def test_concurrent_greedy_under_chunking_and_preemption_matches_generate(oracle: _Oracle) -> None:
    engine = oracle.engine(**TIGHT)
    assert type(engine.runner).__name__ == "GenericRunner"
    steps = record_steps(engine)
    got = run_workload(engine, WORKLOAD)
    for i, (length, max_tokens, _) in enumerate(WORKLOAD):
        assert got[f"r{i}"] == oracle.greedy(prompt_of(length, i), max_tokens), f"r{i} diverged from transformers"
    assert engine.stats().preemptions > 0
    assert any(any(n == 1 for _, n in s.scheduled) and any(n > 1 for _, n in s.scheduled) for s in steps)
    assert engine.kv.num_running == 0


def test_drafts_and_choices_match_generate(oracle: _Oracle) -> None:
    """Draft tokens (right three times in four) as extra decode queries, and n=2 choices sharing the prompt's
    KV, under chunked prefill: every choice still equals transformers alone."""
    requests = WORKLOAD[:4]
    answers = {
        (tuple(prompt_of(length, i)), c): oracle.greedy(prompt_of(length, i), max_tokens)
        for i, (length, max_tokens, _) in enumerate(requests)
        for c in (0, 1)
    }
    engine = oracle.engine(proposer=ScriptedProposer(answers), max_num_batched_tokens=24, speculative_max_rows=32)
    for i, (length, max_tokens, _) in enumerate(requests):
        engine.add_request(make_request(f"r{i}", prompt_of(length, i), temperature=0.0, max_tokens=max_tokens, n=2))
    outputs = run_to_completion(engine)
    for i, (length, max_tokens, _) in enumerate(requests):
        expected = oracle.greedy(prompt_of(length, i), max_tokens)
        assert tokens_by_choice(outputs[f"r{i}"]) == {0: expected, 1: expected}, f"r{i} diverged"
    assert 0 < engine.num_accepted_tokens_total < engine.num_draft_tokens_total


def test_logprobs_and_prompt_logprobs_equal_a_forward_pass(oracle: _Oracle) -> None:
    engine = oracle.engine(max_num_batched_tokens=16)
    prompt = prompt_of(40, 3)
    engine.add_request(
        make_request("lp", prompt, temperature=0.0, max_tokens=10, logprobs=3, prompt_logprobs=2, ignore_eos=True)
    )
    outputs = run_to_completion(engine)["lp"]
    tokens = tokens_by_choice(outputs)[0]
    generated = [lp for out in outputs for c in out.choices for lp in (c.logprobs or [])]
    with torch.no_grad():
        reference = torch.log_softmax(oracle.hf(torch.tensor([prompt + tokens])).logits[0].float(), dim=-1)
    for i, lp in enumerate(generated):
        row = reference[len(prompt) - 1 + i]
        assert lp.token_id == tokens[i] == int(row.argmax())
        assert lp.logprob == pytest.approx(row[lp.token_id].item(), abs=1e-4)
        assert [t.token_id for t in lp.top] == torch.topk(row, 3).indices.tolist()
    prompt_lps = outputs[0].prompt_logprobs
    assert prompt_lps is not None and len(prompt_lps) == len(prompt)
    for i in range(1, len(prompt)):
        assert prompt_lps[i].logprob == pytest.approx(reference[i - 1, prompt[i]].item(), abs=1e-4)
        assert [t.token_id for t in prompt_lps[i].top] == torch.topk(reference[i - 1], 2).indices.tolist()


def test_hidden_states_equal_output_hidden_states(oracle: _Oracle) -> None:
    engine = oracle.engine()
    prompt = prompt_of(30, 4)
    states = engine.runner.hidden_states(prompt, {0, 1, 2})
    with torch.no_grad():
        reference = oracle.hf(torch.tensor([prompt]), output_hidden_states=True).hidden_states
    for layer in (0, 1, 2):
        torch.testing.assert_close(states[layer], reference[layer][0], atol=1e-4, rtol=1e-4)
