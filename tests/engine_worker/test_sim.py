from __future__ import annotations

from pathlib import Path

import pytest

from contracts import GenerateRequest, SamplingParams
from engine_worker.sim import SimConfig, SimEngine, write_sim_tokenizer
from engine_worker.validation import InvalidRequest


def request(request_id: str, max_tokens: int = 3, n: int = 1, seed: int | None = None) -> GenerateRequest:
    return GenerateRequest(
        request_id=request_id,
        model="sim",
        prompt_token_ids=[5, 6, 7],
        reply_subject="x",
        sampling=SamplingParams(max_tokens=max_tokens, n=n, seed=seed),
    )


def run(engine: SimEngine) -> dict[str, list]:
    outputs: dict[str, list] = {}
    while engine.has_unfinished_requests():
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    return outputs


def fast() -> SimEngine:
    return SimEngine(SimConfig(tokens_per_s=10_000, max_num_seqs=4))


def test_tokens_are_deterministic_and_end_at_max_tokens() -> None:
    texts = []
    for _ in range(2):
        engine = fast()
        engine.add_request(request("a", max_tokens=4, seed=3))
        outputs = run(engine)["a"]
        assert len(outputs) == 4 and outputs[-1].finished
        assert outputs[-1].choices[0].finish_reason == "length"
        assert outputs[-1].usage.completion_tokens == 4
        texts.append("".join(o.choices[0].text for o in outputs))
    assert texts[0] == texts[1]


def test_choices_differ_and_slots_bound_admission() -> None:
    engine = fast()
    engine.add_request(request("wide", n=3))
    engine.add_request(request("next", n=2))  # 3 + 2 > 4 slots: waits for "wide"
    first = engine.step()
    assert [o.request_id for o in first] == ["wide"]
    assert len({choice.text for choice in first[0].choices}) == 3
    assert "next" in run(engine)


def test_abort_ends_the_request_with_abort() -> None:
    engine = fast()
    engine.add_request(request("a", max_tokens=100))
    engine.step()
    engine.abort_request("a")
    [final] = run(engine)["a"]
    assert final.finished and {c.finish_reason for c in final.choices} == {"abort"}


def test_context_overflow_is_rejected() -> None:
    engine = SimEngine(SimConfig(max_model_len=8))
    with pytest.raises(ValueError, match="context"):
        engine.add_request(request("a", max_tokens=6))


def test_a_constrained_request_is_refused_not_answered_freely() -> None:
    engine = SimEngine(SimConfig())
    constrained = request("a", max_tokens=6).model_copy(update={"constraint": {"type": "json_object"}})
    with pytest.raises(InvalidRequest, match="structured outputs"):
        engine.validate(GenerateRequest.model_validate(constrained.model_dump()))


def test_tokenizer_round_trips_words(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(write_sim_tokenizer(tmp_path, 100))
    ids = tokenizer.encode("w5 w17 w99")
    assert ids == [5, 17, 99]
    assert tokenizer.decode(ids) == "w5 w17 w99"
    assert tokenizer.apply_chat_template(
        [{"role": "user", "content": "w5"}], tokenize=False, add_generation_prompt=True
    ).endswith("assistant:")


def test_a_resumed_request_continues_and_counts_its_resumed_tokens_as_the_real_engine_does() -> None:
    whole = run_one(request("a", max_tokens=6, seed=3))
    first_four = [token for output in whole[:4] for token in output.choices[0].token_ids]
    resumed = request("a", max_tokens=6, seed=3).model_copy(update={"attempt": 2, "resume_token_ids": first_four})
    rest = run_one(resumed)
    assert [o.choices[0].token_ids for o in rest] == [o.choices[0].token_ids for o in whole[4:]]
    assert rest[-1].usage.completion_tokens == whole[-1].usage.completion_tokens == 6


def run_one(req: GenerateRequest) -> list:
    engine = fast()
    engine.add_request(req)
    return run(engine)[req.request_id]
