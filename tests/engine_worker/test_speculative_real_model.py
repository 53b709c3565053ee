"""N-gram speculative decoding on the packaged SmolLM2: its guesses from real text are mostly right, they cut
the number of engine steps, and the output stays what decoding one token at a time gives (fp32)."""

from __future__ import annotations

from pathlib import Path

import pytest

from engine_worker.engine import Engine, EngineConfig
from ops.bench.prompts import prompt_token_ids
from tests.engine_worker.conftest import make_request

pytestmark = pytest.mark.slow


def _generate(model_dir: Path, prompts: list[list[int]], **config) -> tuple[list[list[int]], int, Engine]:
    # Dense weights: quantized copies serve only small steps, so drafted (larger) steps would run other weights.
    exact = {"dtype": "float32", "device": "cpu", "max_num_seqs": 4, "torch_threads": 1, "weight_quant": "none"}
    engine = Engine.from_pretrained(model_dir, EngineConfig(**exact, **config))
    for i, prompt in enumerate(prompts):
        engine.add_request(make_request(f"r{i}", prompt, temperature=0.0, max_tokens=96, ignore_eos=True))
    tokens: dict[str, list[int]] = {}
    steps = 0
    while engine.has_unfinished_requests():
        for output in engine.step():
            tokens.setdefault(output.request_id, []).extend(t for c in output.choices for t in c.token_ids)
        steps += 1
    return [tokens[f"r{i}"] for i in range(len(prompts))], steps, engine


def test_ngram_drafts_on_the_packaged_model(smollm2_dir: Path) -> None:
    prompts = [prompt_token_ids(0, i, 64) for i in range(2)]  # the bench's prompts
    plain, plain_steps, _ = _generate(smollm2_dir, prompts, num_speculative_tokens=0)
    drafted, steps, engine = _generate(smollm2_dir, prompts, num_speculative_tokens=4)
    assert drafted == plain
    assert engine.num_accepted_tokens_total > 0.5 * engine.num_draft_tokens_total > 0
    assert steps < 0.7 * plain_steps
