"""Structured outputs through the engine (tiny random llama: it writes garbage, so only the grammar makes the
output valid). Oracle: greedy constrained output equals a plain HF forward pass masked step by step by a fresh
matcher of the same constraint, whatever the batch mix, preemption, n-gram drafts, or a resume."""

from __future__ import annotations

import json
import re
import threading
import time
from typing import Annotated

import numpy as np
import pytest
import torch
from pydantic import BaseModel, ConfigDict, Field

from contracts import FinishReason
from contracts.constraints import JsonSchemaConstraint, RegexConstraint, parse_constraint
from engine_worker.constraints import unpack_bitmask
from engine_worker.validation import InvalidRequest
from tests.engine_worker.conftest import make_request, prompt_of, run_to_completion, text_by_choice, tokens_by_choice


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false, as the OpenAI SDK sends

    name: str = Field(max_length=12)
    age: int = Field(ge=0, le=120)
    tags: list[Annotated[str, Field(max_length=10)]] = Field(max_length=3)


PERSON = JsonSchemaConstraint(json_schema=Person.model_json_schema())
LONG_REGEX = RegexConstraint(pattern=r"[a-z]{60}( [0-9]{3}){12}")  # long enough to be preempted mid-way


def constrained(request_id: str, prompt: list[int], constraint, **sampling):
    return make_request(request_id, prompt, **sampling).model_copy(update={"constraint": constraint})


def run_collecting_rejections(engine, deadline_s: float = 120.0) -> tuple[dict[str, list], dict[str, InvalidRequest]]:
    """Step until nothing is left, as the engine loop does: outputs by request, and the requests failed after
    admission (`take_rejected`) with their reason."""
    outputs: dict[str, list] = {}
    rejected: dict[str, InvalidRequest] = {}
    deadline = time.monotonic() + deadline_s
    while engine.has_unfinished_requests():
        assert time.monotonic() < deadline, "engine did not finish"
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
        rejected.update(engine.take_rejected())
    return outputs, rejected


def masked_greedy(hf_model, engine, prompt: list[int], constraint, max_tokens: int) -> list[int]:
    """The reference: one HF forward per token, refused tokens set to -inf, argmax, until EOS or the grammar
    stops."""
    matcher = engine.structured.compiler.matcher(constraint)
    out: list[int] = []
    row = np.full((1, engine.structured.compiler.words), -1, dtype=np.int32)
    while len(out) < max_tokens:
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt + out])).logits[0, -1].float()
        matcher.fill_bitmask(row[0])
        allowed = torch.from_numpy(unpack_bitmask(row, logits.shape[0])[0])
        token = int(logits.masked_fill(~allowed, -float("inf")).argmax())
        out.append(token)
        if token in engine.eos_token_ids:
            break
        matcher.consume([token])
        if matcher.is_stopped():
            break
    return out


@pytest.mark.parametrize(
    "config",
    [
        pytest.param({}, id="roomy"),
        pytest.param({"max_num_batched_tokens": 32, "kv_cache_tokens": 512}, id="preemption"),
        pytest.param(
            {"num_speculative_tokens": 3, "speculative_max_rows": 16}, id="ngram-drafts"
        ),  # a batch that drafts
    ],
)
def test_greedy_constrained_output_equals_the_masked_reference(engine_factory, hf_model, config) -> None:
    engine = engine_factory(**config)
    # Unconstrained batch-mates that grow together so the small cache must preempt.
    for i, (length, max_tokens) in enumerate([(120, 100), (110, 100), (100, 100)]):
        engine.add_request(
            make_request(f"free{i}", prompt_of(length, i), temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        )
    cases = {"person": (prompt_of(9, 7), PERSON, 200), "long": (prompt_of(14, 8), LONG_REGEX, 160)}
    for name, (prompt, constraint, max_tokens) in cases.items():
        # A lower rank (higher priority value): the constrained choices are the ones the scheduler preempts.
        engine.add_request(constrained(name, prompt, constraint, temperature=0.0, max_tokens=max_tokens, priority=5))
    seqs = [seq for name in cases for seq in engine._requests[name].seqs]
    constrained_drafts = []
    trim = engine.structured.trim_drafts

    def recording_trim(running) -> None:
        trim(running)
        constrained_drafts.extend(len(seq.draft_token_ids) for seq in running if seq.matcher is not None)

    engine.structured.trim_drafts = recording_trim
    outputs = run_to_completion(engine)
    if "kv_cache_tokens" in config:
        assert sum(seq.num_preemptions for seq in seqs) > 0  # a constrained choice was recomputed
    if "num_speculative_tokens" in config:
        assert sum(constrained_drafts) > 0  # constrained choices were verified with (grammar-checked) drafts
    for name, (prompt, constraint, max_tokens) in cases.items():
        got = tokens_by_choice(outputs[name])[0]
        assert got == masked_greedy(hf_model, engine, prompt, constraint, max_tokens), name
    Person.model_validate_json(text_by_choice(outputs["person"])[0])
    assert re.fullmatch(LONG_REGEX.pattern, text_by_choice(outputs["long"])[0])


@pytest.mark.parametrize("where", ["same-worker", "fresh-worker"])
def test_a_resumed_constrained_request_continues_like_the_undisturbed_run(engine_factory, where) -> None:
    """Same worker: the grammar is cached and copied at admission; fresh worker (as after a crash): it is compiled
    while the request waits, then the resumed tokens are replayed into the new matcher."""
    engine = engine_factory()
    prompt = prompt_of(9, 3)
    engine.add_request(constrained("whole", prompt, LONG_REGEX, temperature=0.0, max_tokens=160))
    whole = tokens_by_choice(run_to_completion(engine)["whole"])[0]
    assert len(whole) > 12
    if where == "fresh-worker":
        engine = engine_factory()
    engine.add_request(
        constrained("rest", prompt, LONG_REGEX, temperature=0.0, max_tokens=160, resume_token_ids=whole[:10])
    )
    assert (engine.structured.compiling == 1) == (where == "fresh-worker")
    rest = tokens_by_choice(run_to_completion(engine)["rest"])[0]
    assert whole[:10] + rest == whole


def test_sampled_choices_at_temperature_one_always_validate(engine_factory) -> None:
    engine = engine_factory()
    for seed in range(6):
        engine.add_request(
            constrained(f"s{seed}", prompt_of(7, seed), PERSON, temperature=1.0, seed=seed, n=2, max_tokens=250)
        )
    engine.add_request(constrained("best", prompt_of(7, 99), PERSON, temperature=1.0, n=2, best_of=3, max_tokens=250))
    outputs = run_to_completion(engine)
    texts = [text for outs in outputs.values() for text in text_by_choice(outs).values()]
    assert len(texts) == 14
    for text in texts:
        Person.model_validate_json(text)
    assert len(set(texts)) > 1  # sampling really happened


def test_choice_and_json_object_and_max_tokens_cut(engine_factory) -> None:
    engine = engine_factory()
    engine.add_request(
        constrained(
            "choice",
            prompt_of(5),
            parse_constraint({"type": "choice", "choices": ["alpha", "beta gamma"]}),
            temperature=1.0,
            seed=3,
            max_tokens=20,
        )
    )
    engine.add_request(
        constrained("object", prompt_of(6), parse_constraint({"type": "json_object"}), temperature=0.0, max_tokens=200)
    )
    engine.add_request(constrained("cut", prompt_of(8), LONG_REGEX, temperature=0.0, max_tokens=5))
    outputs = run_to_completion(engine)
    assert text_by_choice(outputs["choice"])[0] in {"alpha", "beta gamma"}
    assert outputs["choice"][-1].choices[-1].finish_reason is FinishReason.STOP
    obj = text_by_choice(outputs["object"])[0]
    if outputs["object"][-1].choices[-1].finish_reason is FinishReason.STOP:
        assert isinstance(json.loads(obj), dict)
    cut = outputs["cut"][-1].choices[-1]
    assert cut.finish_reason is FinishReason.LENGTH
    text = text_by_choice(outputs["cut"])[0]
    assert len(tokens_by_choice(outputs["cut"])[0]) == 5 and re.fullmatch(r"[a-z]*", text) and text


def test_a_constraint_that_does_not_compile_or_fit_the_resume_fails_only_its_request(engine_factory) -> None:
    """Compiled off the engine thread, a bad constraint fails its request after admission (`take_rejected`, which
    the engine loop reports like an admission refusal) while the batch goes on; a resume that does not fit a grammar
    already cached is refused at admission."""
    engine = engine_factory()
    digits = engine.tokenizer.encode("123", add_special_tokens=False)
    engine.add_request(make_request("free", prompt_of(5), temperature=0.0, max_tokens=6, ignore_eos=True))
    engine.add_request(constrained("bad", prompt_of(5, 1), RegexConstraint(pattern="(unclosed")))
    engine.add_request(constrained("resume", prompt_of(5, 2), LONG_REGEX, max_tokens=50, resume_token_ids=digits))
    outputs, rejected = run_collecting_rejections(engine)
    assert set(rejected) == {"bad", "resume"} and set(outputs) == {"free"}
    assert str(rejected["bad"]).startswith("constraint:")
    assert "resume_token_ids do not fit the constraint" in str(rejected["resume"])
    assert len(tokens_by_choice(outputs["free"])[0]) == 6
    assert engine.structured.compiler.cache_len == 1  # LONG_REGEX compiled (only the resume did not fit)
    with pytest.raises(InvalidRequest, match="resume_token_ids"):
        engine.add_request(constrained("again", prompt_of(5, 3), LONG_REGEX, max_tokens=50, resume_token_ids=digits))
    assert not engine.has_unfinished_requests() and not engine.take_rejected()


def test_a_tokenizer_llguidance_cannot_read_refuses_the_request_not_the_engine(engine_factory) -> None:
    engine = engine_factory()
    engine.structured._tokenizer = object()  # not a HF tokenizer
    engine.add_request(constrained("x", prompt_of(5), LONG_REGEX, max_tokens=5))
    engine.add_request(make_request("free", prompt_of(5), temperature=0.0, max_tokens=3, ignore_eos=True))
    outputs = run_to_completion(engine)
    assert len(tokens_by_choice(outputs["free"])[0]) == 3 and "x" not in outputs
    [(request_id, exc)] = engine.take_rejected()
    assert request_id == "x" and "cannot be used for structured outputs" in str(exc)


def test_masks_are_filled_while_the_forward_pass_runs(engine_factory) -> None:
    """The mask fill waits until the forward pass has begun: were masks still computed before `runner.run`, it
    would time out and record that the two did not overlap. The output must still obey the grammar."""
    engine = engine_factory()
    engine.structured.compiler.matcher(LONG_REGEX)  # compiled ahead: every step runs the constrained request
    engine.add_request(constrained("long", prompt_of(9, 4), LONG_REGEX, temperature=0.0, max_tokens=20))
    engine.add_request(make_request("free", prompt_of(9, 5), temperature=0.0, max_tokens=20, ignore_eos=True))
    filler = engine.structured._filler
    assert filler is not None  # built with the compiler
    forward_started = threading.Event()
    overlapped: list[bool] = []
    fill, run = filler.fill_with_drafts, engine.runner.run

    def fill_once_the_forward_began(*args, **kwargs) -> None:
        overlapped.append(forward_started.wait(timeout=5))
        forward_started.clear()
        fill(*args, **kwargs)

    def run_signalling(*args, **kwargs):
        forward_started.set()
        return run(*args, **kwargs)

    filler.fill_with_drafts = fill_once_the_forward_began
    engine.runner.run = run_signalling
    outputs = run_to_completion(engine)
    assert overlapped and all(overlapped), overlapped
    assert re.fullmatch(r"[a-z]{60}( [0-9]{3})*( [0-9]{0,2})?", text_by_choice(outputs["long"])[0])  # LONG_REGEX cut
    assert len(tokens_by_choice(outputs["free"])[0]) == 20


def test_a_failed_forward_pass_still_waits_for_the_mask_fill(engine_factory) -> None:
    """No matcher may be touched while the mask thread reads it: the step settles the fill even when it raises."""
    engine = engine_factory()
    engine.structured.compiler.matcher(LONG_REGEX)  # compiled ahead: the first step runs the constrained request
    engine.add_request(constrained("long", prompt_of(9, 6), LONG_REGEX, temperature=0.0, max_tokens=20))
    filler = engine.structured._filler
    assert filler is not None
    fill, finished = filler.fill_with_drafts, threading.Event()

    def slow_fill(*args, **kwargs) -> None:
        time.sleep(0.3)
        fill(*args, **kwargs)
        finished.set()

    def failing_run(*args, **kwargs):
        raise RuntimeError("device lost")

    filler.fill_with_drafts = slow_fill
    engine.runner.run = failing_run
    with pytest.raises(RuntimeError, match="device lost"):
        engine.step()
    assert finished.is_set()
