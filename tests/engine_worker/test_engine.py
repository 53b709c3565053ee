"""Engine behaviour on the tiny model: abort, resume, seeds, n/best_of, stops, priority, validation, usage."""

from __future__ import annotations

import pytest

from contracts import FinishReason
from engine_worker.outputs import EngineStats
from tests.engine_worker.conftest import (
    make_request,
    prompt_of,
    run_to_completion,
    text_by_choice,
    tokens_by_choice,
)


def _single(engine, request_id: str, prompt: list[int], **sampling) -> tuple[list[int], list]:
    engine.add_request(make_request(request_id, prompt, **sampling))
    outputs = run_to_completion(engine)[request_id]
    return tokens_by_choice(outputs)[0], outputs


def test_abort_frees_the_slot_at_once_and_reports_abort(engine_factory) -> None:
    engine = engine_factory(max_num_seqs=2)
    engine.add_request(make_request("a", prompt_of(10), temperature=0.0, max_tokens=50))
    engine.add_request(make_request("b", prompt_of(10, 1), temperature=0.0, max_tokens=50, n=1))
    engine.add_request(make_request("c", prompt_of(10, 2), temperature=0.0, max_tokens=5))
    for _ in range(3):
        engine.step()
    assert (engine.stats().running, engine.stats().waiting) == (2, 1)
    engine.abort_request("a")
    assert engine.kv.num_running == 1  # freed before any further step
    outputs = engine.step()
    aborted = [o for o in outputs if o.request_id == "a"]
    assert len(aborted) == 1 and aborted[0].finished
    assert [(c.index, c.finish_reason) for c in aborted[0].choices] == [(0, FinishReason.ABORT)]
    assert aborted[0].usage is not None and aborted[0].usage.completion_tokens == 3
    # The waiting request took the freed slot in that same step, and "a" never runs again.
    assert any(seq.request_id == "c" for seq in engine.scheduler.running)
    rest = run_to_completion(engine)
    assert "a" not in rest and rest["c"][-1].finished
    engine.abort_request("a")  # unknown or finished ids are ignored
    engine.abort_request("nope")
    assert not engine.has_unfinished_requests()


def test_abort_of_a_waiting_request(engine_factory) -> None:
    engine = engine_factory(max_num_seqs=1)
    engine.add_request(make_request("a", prompt_of(6), temperature=0.0, max_tokens=4))
    engine.add_request(make_request("b", prompt_of(6, 1), temperature=0.0, max_tokens=4, n=1))
    engine.step()
    engine.abort_request("b")
    outputs = run_to_completion(engine)
    assert outputs["b"][-1].choices[0].finish_reason == FinishReason.ABORT
    assert tokens_by_choice(outputs["a"])[0] and not engine.scheduler.waiting


@pytest.mark.parametrize("sampling", [{"temperature": 0.0}, {"temperature": 1.0, "seed": 7, "top_k": 50}])
def test_resume_continues_exactly_like_an_uninterrupted_run(engine_factory, sampling) -> None:
    prompt = prompt_of(15, 4)
    full, full_outputs = _single(engine_factory(), "full", prompt, max_tokens=30, ignore_eos=True, **sampling)
    assert len(full) == 30
    engine = engine_factory()
    resumed, outputs = _single(
        engine, "again", prompt, max_tokens=30, ignore_eos=True, resume_token_ids=full[:12], **sampling
    )
    assert resumed == full[12:]
    assert outputs[-1].usage.completion_tokens == 30 and outputs[-1].usage.prompt_tokens == 15
    full_text = text_by_choice(full_outputs)[0]
    assert full_text.endswith(text_by_choice(outputs)[0])


def test_seeded_sampling_ignores_batch_mates_and_row_position(engine_factory) -> None:
    params = {"temperature": 1.0, "seed": 1234, "max_tokens": 25, "ignore_eos": True}
    alone, _ = _single(engine_factory(), "s", prompt_of(9, 3), **params)
    engine = engine_factory()
    for i in range(4):  # unseeded neighbours with other lengths, added first so "s" sits at another row
        engine.add_request(make_request(f"x{i}", prompt_of(5 + 7 * i, 10 + i), temperature=1.0, max_tokens=30))
    engine.add_request(make_request("s", prompt_of(9, 3), **params))
    crowded = tokens_by_choice(run_to_completion(engine)["s"])[0]
    assert crowded == alone
    other_seed, _ = _single(engine_factory(), "t", prompt_of(9, 3), **{**params, "seed": 99})
    assert other_seed != alone


def test_n_choices_differ_and_stream_independently(engine_factory) -> None:
    engine = engine_factory()
    engine.add_request(make_request("n", prompt_of(8, 2), temperature=1.0, n=3, max_tokens=20, ignore_eos=True))
    outputs = run_to_completion(engine)["n"]
    by_choice = tokens_by_choice(outputs)
    assert sorted(by_choice) == [0, 1, 2] and all(len(t) == 20 for t in by_choice.values())
    assert len({tuple(t) for t in by_choice.values()}) == 3
    assert sum(1 for o in outputs if o.finished) == 1 and outputs[-1].finished
    assert outputs[-1].usage.completion_tokens == 60
    # Seeded n>1 is reproducible, and choice i matches across runs.
    seeded = {"temperature": 1.0, "n": 2, "seed": 5, "max_tokens": 12, "ignore_eos": True}
    runs = []
    for _ in range(2):
        engine = engine_factory()
        engine.add_request(make_request("m", prompt_of(8, 2), **seeded))
        runs.append(tokens_by_choice(run_to_completion(engine)["m"]))
    assert runs[0] == runs[1] and runs[0][0] != runs[0][1]


def test_best_of_returns_the_highest_cumulative_logprob_at_the_end(engine_factory) -> None:
    common = {"temperature": 1.0, "seed": 11, "max_tokens": 10, "ignore_eos": True}
    engine = engine_factory()
    engine.add_request(make_request("all", prompt_of(7, 6), n=4, logprobs=0, **common))
    outputs = run_to_completion(engine)["all"]
    candidates: dict[int, list] = {}
    for output in outputs:
        for choice in output.choices:
            candidates.setdefault(choice.index, []).extend(choice.logprobs)
    scores = {i: sum(lp.logprob for lp in lps) for i, lps in candidates.items()}
    best = max(scores, key=scores.get)

    engine = engine_factory()
    engine.add_request(make_request("best", prompt_of(7, 6), n=1, best_of=4, **common))
    outputs = run_to_completion(engine)["best"]
    assert all(not o.choices for o in outputs[:-1])
    (choice,) = outputs[-1].choices
    assert choice.index == 0 and choice.token_ids == [lp.token_id for lp in candidates[best]]
    assert choice.logprobs is None  # not asked for
    assert outputs[-1].usage.completion_tokens == 10


def test_stop_token_ids_and_stop_strings(engine_factory, tiny_tokenizer) -> None:
    prompt = prompt_of(10, 9)
    free, outputs = _single(engine_factory(), "free", prompt, temperature=0.0, max_tokens=20, ignore_eos=True)
    full_text = text_by_choice(outputs)[0]

    stop_id = free[5]
    tokens, outputs = _single(engine_factory(), "tok", prompt, temperature=0.0, max_tokens=20, stop_token_ids=[stop_id])
    last = outputs[-1].choices[-1]
    assert tokens == free[: free.index(stop_id) + 1]
    assert last.finish_reason == FinishReason.STOP and last.stop_reason == stop_id
    assert text_by_choice(outputs)[0] == tiny_tokenizer.decode(tokens[:-1], skip_special_tokens=True)

    stop = full_text[len(full_text) // 2 : len(full_text) // 2 + 3]
    for include in (False, True):
        _, outputs = _single(
            engine_factory(),
            "str",
            prompt,
            temperature=0.0,
            max_tokens=20,
            ignore_eos=True,
            stop=[stop],
            include_stop_str_in_output=include,
        )
        text = text_by_choice(outputs)[0]
        cut = full_text.index(stop)
        assert text == full_text[: cut + (len(stop) if include else 0)]
        assert outputs[-1].choices[-1].stop_reason == stop


def test_streamed_text_and_tokens_stay_aligned(engine_factory, tiny_tokenizer) -> None:
    engine = engine_factory()
    prompt = prompt_of(12, 1)
    engine.add_request(make_request("t", prompt, temperature=1.0, seed=3, max_tokens=40, ignore_eos=True))
    outputs = run_to_completion(engine)["t"]
    sent: list[int] = []
    text = ""
    for output in outputs:
        for choice in output.choices:
            sent += choice.token_ids
            text += choice.text
            # Whatever was sent so far decodes (in context) to exactly the text sent so far.
            full = tiny_tokenizer.decode(prompt + sent, skip_special_tokens=True)
            assert full.endswith(text)
    assert len(sent) == 40


def test_priority_orders_admission(engine_factory) -> None:
    engine = engine_factory(max_num_seqs=1)
    engine.add_request(make_request("late", prompt_of(5), temperature=0.0, max_tokens=3, priority=5))
    engine.add_request(make_request("urgent", prompt_of(5, 1), temperature=0.0, max_tokens=3, priority=-1))
    engine.add_request(make_request("normal", prompt_of(5, 2), temperature=0.0, max_tokens=3))
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["urgent", "normal", "late"]


def test_max_tokens_defaults_to_the_rest_of_the_context(engine_factory) -> None:
    engine = engine_factory(max_model_len=64)
    tokens, outputs = _single(engine, "d", prompt_of(50), temperature=0.0, ignore_eos=True)
    assert len(tokens) == 14 and outputs[-1].choices[-1].finish_reason == FinishReason.LENGTH


def test_validation_errors_name_the_numbers(engine_factory) -> None:
    engine = engine_factory(max_model_len=64)
    with pytest.raises(ValueError, match=r"64 tokens.*60 prompt tokens.*max_tokens=10.*70"):
        engine.add_request(make_request("a", prompt_of(60), max_tokens=10))
    with pytest.raises(ValueError, match="64"):
        engine.add_request(make_request("b", prompt_of(64)))
    with pytest.raises(ValueError, match=r"token id 999999.*vocabulary"):
        engine.add_request(make_request("c", [1, 999999]))
    with pytest.raises(ValueError, match="resume_token_ids"):
        engine.add_request(make_request("d", prompt_of(5), n=2, resume_token_ids=[5]))
    with pytest.raises(ValueError, match="already reach max_tokens"):
        engine.add_request(make_request("e", prompt_of(5), max_tokens=2, resume_token_ids=[5, 6]))
    with pytest.raises(ValueError, match="stop_token_ids"):
        engine.add_request(make_request("f", prompt_of(5), stop_token_ids=[10**7]))
    engine.add_request(make_request("ok", prompt_of(5), max_tokens=2))
    with pytest.raises(ValueError, match="already"):
        engine.add_request(make_request("ok", prompt_of(5), max_tokens=2))
    assert engine.stats().waiting == 1 and not engine.scheduler.running


def test_stats_count_requests_and_kv_usage(engine_factory) -> None:
    engine = engine_factory(max_num_seqs=4)
    engine.add_request(make_request("a", prompt_of(5), n=3, temperature=1.0, max_tokens=5))
    assert (engine.stats().running, engine.stats().waiting) == (0, 1)
    engine.step()  # choice 0 computes the prompt ...
    engine.step()  # ... which choices 1 and 2 then copy
    stats = engine.stats()
    assert (stats.running, stats.waiting) == (1, 0) and 0 < stats.kv_cache_usage <= 1
    run_to_completion(engine)
    drafts, accepted = engine.num_draft_tokens_total, engine.num_accepted_tokens_total
    # The prefix cache was asked for choice 0's 5 prompt tokens (the others copy them) and had none.
    assert engine.stats() == EngineStats(0, 0, 0.0, 0, drafts, accepted, prefix_cache_queries=5, prefix_cache_hits=0)


def test_embeddings_equal_hf_hidden_states(engine_factory, hf_model) -> None:
    import torch

    from contracts import EmbedRequest

    engine = engine_factory()
    inputs = [prompt_of(9, 1), prompt_of(23, 2)]
    request = EmbedRequest(
        request_id="e",
        model="tiny",
        inputs=inputs,
        layers=[-1, 0, 1],
        pooling=["mean", "last_token"],
        normalize=False,
        reply_subject="x",
    )
    engine.validate(request)
    (output,) = engine.embed([request])
    assert output.usage.prompt_tokens == 32 and len(output.vectors) == 2 * 3 * 2
    for vector in output.vectors:
        with torch.no_grad():
            states = hf_model(torch.tensor([inputs[vector.input_index]]), output_hidden_states=True).hidden_states
        hidden = states[vector.layer][0]
        expected = hidden.mean(dim=0) if vector.pooling == "mean" else hidden[-1]
        assert vector.values == pytest.approx(expected.tolist(), abs=1e-4)
    assert {v.layer for v in output.vectors} == {0, 1, 2}
    with pytest.raises(ValueError, match="layer 5"):
        engine.validate(request.model_copy(update={"layers": [5]}))
    with pytest.raises(ValueError, match="context length"):
        engine.validate(request.model_copy(update={"inputs": [prompt_of(600)]}))
