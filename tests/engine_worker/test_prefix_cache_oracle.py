"""The oracle with the prefix cache on: requests that share prefixes (whole blocks, partial blocks, a whole
earlier prompt) produce, greedy, exactly what transformers `generate()` produces for each alone, whatever the
batching, chunking, preemption, n > 1, resume or draft tokens; and they report the cached tokens they reused."""

from __future__ import annotations

import pytest

from contracts.constraints import parse_constraint
from engine_worker.prefix_cache import BLOCK_SIZE
from tests.engine_worker.conftest import (
    ScriptedProposer,
    make_request,
    prompt_of,
    run_to_completion,
    tokens_by_choice,
)

B = BLOCK_SIZE
SYSTEM = prompt_of(3 * B + 4, 50)  # a shared "system prompt": three whole blocks and four tokens


def tail(length: int, offset: int) -> list[int]:
    return prompt_of(length + 1, offset)[1:]


FIRST = SYSTEM + tail(30, 1)  # 130 tokens: cached as four blocks once it has run
# name -> (prompt, max_tokens, tokens it must find cached with room to spare)
SECOND_WAVE = {
    "same-system": (SYSTEM + tail(20, 2), 12, 3 * B),
    "extends-first": (FIRST + tail(40, 3), 10, 4 * B),
    "partial-block": (SYSTEM[: 2 * B + 10] + tail(25, 4), 9, 2 * B),
    "first-again": (FIRST, 8, 4 * B),
    "unrelated": (prompt_of(70, 5), 11, 0),
}


def _run(engine, requests: dict[str, tuple[list[int], int]], **sampling) -> dict[str, list]:
    for name, (prompt, max_tokens) in requests.items():
        engine.add_request(make_request(name, prompt, temperature=0.0, max_tokens=max_tokens, **sampling))
    return run_to_completion(engine)


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({}, id="roomy"),
        pytest.param({"max_num_batched_tokens": 16}, id="chunked-prefill"),
        pytest.param({"max_num_batched_tokens": 48, "kv_cache_tokens": 512, "max_num_seqs": 6}, id="tight-kv"),
    ],
)
def test_shared_prefixes_match_transformers_and_report_cached_tokens(engine_factory, hf_greedy, config) -> None:
    engine = engine_factory(**config)
    first = _run(engine, {"first": (FIRST, 6)})
    assert tokens_by_choice(first["first"])[0] == hf_greedy(FIRST, 6)
    assert first["first"][-1].usage.cached_tokens == 0

    outputs = _run(engine, {name: (prompt, max_tokens) for name, (prompt, max_tokens, _) in SECOND_WAVE.items()})
    for name, (prompt, max_tokens, _) in SECOND_WAVE.items():
        assert tokens_by_choice(outputs[name])[0] == hf_greedy(prompt, max_tokens), name
    cached = {name: outputs[name][-1].usage.cached_tokens for name in SECOND_WAVE}
    queries, hits = engine.prefix.stats
    # Every reported cached token was a hit (a preempted sequence that comes back may hit again).
    assert sum(cached.values()) > 0 and hits >= sum(cached.values()) and queries > hits
    if not config:  # with room to spare, every request finds exactly the whole blocks it shares
        assert cached == {name: want for name, (_, _, want) in SECOND_WAVE.items()}
    assert engine.kv.num_running == 0 and not engine.scheduler.running


def test_choices_resume_and_drafts_on_top_of_cached_blocks(engine_factory, tiny_model_dir, hf_greedy) -> None:
    from engine_worker.engine import Engine

    prompt = SYSTEM + tail(12, 7)
    answer = hf_greedy(prompt, 14)
    answers = {(tuple(prompt), 0): answer, (tuple(prompt), 1): answer}
    base = engine_factory()
    engine = Engine(base.config, base.tokenizer, base.runner, base.eos_token_ids, proposer=ScriptedProposer(answers))
    _run(engine, {"warm": (SYSTEM + tail(8, 8), 2)})

    # n=2 greedy: choice 0 loads the cached prefix, choice 1 copies its prompt; drafts ride on both.
    outputs = _run(engine, {"pair": (prompt, 14)}, n=2)["pair"]
    assert tokens_by_choice(outputs) == {0: answer, 1: answer}
    assert outputs[-1].usage.cached_tokens == 3 * B
    assert engine.num_draft_tokens_total > 0

    # best_of=2, n=1: both candidates run on the cached prefix; the one returned is the greedy answer.
    best = _run(engine, {"best": (prompt, 14)}, best_of=2)["best"]
    assert tokens_by_choice(best) == {0: answer} and best[-1].usage.cached_tokens == 3 * B

    # A resumed request: its prompt and delivered tokens are looked up, and it continues where it was.
    engine.add_request(make_request("resumed", prompt, temperature=0.0, max_tokens=14, resume_token_ids=answer[:5]))
    resumed = run_to_completion(engine)["resumed"]
    assert tokens_by_choice(resumed)[0] == answer[5:]
    assert resumed[-1].usage.cached_tokens == 3 * B


def test_preempted_sequences_recompute_over_cached_blocks(engine_factory, hf_greedy) -> None:
    """Four sequences that grow past what 512 tokens of KV hold: some are preempted, evicting cached blocks first
    and re-finding what is left when they come back."""
    engine = engine_factory(max_num_batched_tokens=32, kv_cache_tokens=512, max_num_seqs=4)
    _run(engine, {"warm": (SYSTEM + tail(4, 9), 2)})
    requests = {f"g{i}": (SYSTEM + tail(5 + 3 * i, 10 + i), 90) for i in range(4)}
    outputs = _run(engine, requests)
    for name, (prompt, max_tokens) in requests.items():
        assert tokens_by_choice(outputs[name])[0] == hf_greedy(prompt, max_tokens), name
    assert engine.stats().preemptions > 0
    assert engine.prefix.stats[1] > 0


def test_prompt_logprobs_are_computed_not_skipped(engine_factory) -> None:
    engine = engine_factory()
    prompt = SYSTEM + tail(10, 11)
    first = _run(engine, {"a": (prompt, 3)}, prompt_logprobs=2)["a"]
    second = _run(engine, {"b": (prompt, 3)}, prompt_logprobs=2)["b"]
    assert second[-1].usage.cached_tokens == 0  # its prompt was cached, but it computes every position
    got = [None if e is None else (e.token_id, round(e.logprob, 4)) for e in second[0].prompt_logprobs]
    want = [None if e is None else (e.token_id, round(e.logprob, 4)) for e in first[0].prompt_logprobs]
    assert got == want and len(got) == len(prompt)
    third = _run(engine, {"c": (prompt, 3)})["c"]  # without prompt logprobs it does use the cache
    assert third[-1].usage.cached_tokens == 3 * B  # 110 tokens: three whole blocks


def test_structured_output_is_the_same_with_and_without_the_cache(engine_factory) -> None:
    constraint = parse_constraint({"type": "regex", "pattern": "[a-z]{3,12}( [a-z]{2,8}){2}"})
    prompt = SYSTEM + tail(9, 12)

    def constrained_run(engine, name: str) -> tuple[list[int], int]:
        request = make_request(name, prompt, temperature=0.0, max_tokens=40)
        engine.add_request(request.model_copy(update={"constraint": constraint}))
        out = run_to_completion(engine)[name]
        return tokens_by_choice(out)[0], out[-1].usage.cached_tokens

    cached_engine = engine_factory()
    _run(cached_engine, {"warm": (SYSTEM + tail(3, 13), 2)})
    with_cache, cached = constrained_run(cached_engine, "s")
    without_cache, _ = constrained_run(engine_factory(prefix_caching=False), "s")
    assert cached == 3 * B and with_cache == without_cache and with_cache


def test_salts_keep_owners_apart_and_the_setting_turns_it_off(engine_factory) -> None:
    engine = engine_factory()
    prompt = SYSTEM + tail(10, 14)

    def cached_for(name: str, salt: str | None) -> int:
        request = make_request(name, prompt, temperature=0.0, max_tokens=2).model_copy(update={"cache_salt": salt})
        engine.add_request(request)
        return run_to_completion(engine)[name][-1].usage.cached_tokens

    assert cached_for("a1", "owner-a") == 0
    assert cached_for("b1", "owner-b") == 0  # another owner's identical prompt: no hit
    assert cached_for("a2", "owner-a") == 3 * B
    assert cached_for("n1", None) == 0  # no salt shares only with other unsalted requests
    assert cached_for("n2", None) == 3 * B

    off = engine_factory(prefix_caching=False)
    for name in ("x", "y"):
        off.add_request(make_request(name, prompt, temperature=0.0, max_tokens=2))
        assert run_to_completion(off)[name][-1].usage.cached_tokens == 0
    assert off.prefix is None and off.stats().prefix_cache_queries is None
