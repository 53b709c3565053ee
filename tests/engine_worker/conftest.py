"""Engine fixtures on the tiny random llama (fp32, CPU): engines with chosen budgets, and the transformers
reference the engine must match token for token."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from contracts import GenerateRequest, SamplingParams
from engine_worker.engine import Engine, EngineConfig
from engine_worker.outputs import RequestOutput
from engine_worker.scheduler import SchedulerOutput


def make_request(request_id: str, prompt: list[int], **sampling: Any) -> GenerateRequest:
    extra = {k: sampling.pop(k) for k in ("resume_token_ids", "priority") if k in sampling}
    return GenerateRequest(
        request_id=request_id,
        model="tiny",
        prompt_token_ids=prompt,
        sampling=SamplingParams(**sampling),
        reply_subject="inf.tok.test." + request_id,
        **extra,
    )


def prompt_of(length: int, offset: int = 0) -> list[int]:
    """A deterministic prompt of ordinary (non-special) token ids."""
    return [1] + [1000 + (offset * 131 + i * 17) % 30000 for i in range(length - 1)]


def run_to_completion(engine: Engine, max_steps: int = 10_000) -> dict[str, list[RequestOutput]]:
    outputs: dict[str, list[RequestOutput]] = {}
    for _ in range(max_steps):
        if not engine.has_unfinished_requests():
            return outputs
        for output in engine.step():
            outputs.setdefault(output.request_id, []).append(output)
    raise AssertionError("engine did not finish")


def tokens_by_choice(outputs: Iterable[RequestOutput]) -> dict[int, list[int]]:
    result: dict[int, list[int]] = {}
    for output in outputs:
        for choice in output.choices:
            result.setdefault(choice.index, []).extend(choice.token_ids)
    return result


def text_by_choice(outputs: Iterable[RequestOutput]) -> dict[int, str]:
    result: dict[int, str] = {}
    for output in outputs:
        for choice in output.choices:
            result[choice.index] = result.get(choice.index, "") + choice.text
    return result


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_model_dir)


@pytest.fixture(scope="session")
def hf_model(tiny_model_dir: Path) -> Any:
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def hf_greedy(hf_model: Any) -> Callable[..., list[int]]:
    return greedy_reference(hf_model)


def greedy_reference(hf_model: Any) -> Callable[..., list[int]]:
    """transformers `generate(do_sample=False)` for one request alone (cached)."""
    import torch

    cache: dict[tuple, list[int]] = {}

    def generate(prompt: list[int], max_new_tokens: int, ignore_eos: bool = True) -> list[int]:
        key = (tuple(prompt), max_new_tokens, ignore_eos)
        if key not in cache:
            extra = {"min_new_tokens": max_new_tokens} if ignore_eos else {}
            with torch.no_grad():
                out = hf_model.generate(torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new_tokens, **extra)
            cache[key] = out[0, len(prompt) :].tolist()
        return cache[key]

    return generate


@pytest.fixture(scope="session")
def engine_factory(tiny_model_dir: Path) -> Callable[..., Engine]:
    def make(**overrides: Any) -> Engine:
        # One thread: tests share two cores with other work, and oversubscribed torch threads crawl.
        # The oracle runs dense weights: quantized copies have their own tolerance tests (test_weight_quant.py).
        config = {"dtype": "float32", "device": "cpu", "max_num_seqs": 8, "torch_threads": 1, "weight_quant": "none"}
        config.update(overrides)
        return Engine.from_pretrained(tiny_model_dir, EngineConfig(**config))

    return make


def record_steps(engine) -> list[SchedulerOutput]:
    steps: list[SchedulerOutput] = []
    schedule = engine.scheduler.schedule

    def recording() -> SchedulerOutput:
        out = schedule()
        steps.append(out)
        return out

    engine.scheduler.schedule = recording
    return steps


def run_workload(engine: Engine, workload: list[tuple[int, int, int]]) -> dict[str, list[int]]:
    """Add greedy requests (prompt length, max_tokens, step to add at) as the steps go; tokens by request id."""
    got: dict[str, list[int]] = {}
    pending = sorted(enumerate(workload), key=lambda item: item[1][2])
    step = 0
    while pending or engine.has_unfinished_requests():
        while pending and pending[0][1][2] <= step:
            i, (length, max_tokens, _) = pending.pop(0)
            engine.add_request(make_request(f"r{i}", prompt_of(length, i), temperature=0.0, max_tokens=max_tokens))
        for output in engine.step():
            for choice in output.choices:
                got.setdefault(output.request_id, []).extend(choice.token_ids)
        step += 1
        assert step < 5000
    return got


class ScriptedProposer:
    """Draft tokens from a known answer (prompt, choice index) -> tokens, with every `wrong_every`-th output
    position guessed wrong, so steps both accept and reject drafts. Proposes nothing once a sequence has left
    its script (the test then fails on the output)."""

    def __init__(
        self, answers: dict[tuple[tuple[int, ...], int], list[int]], wrong_every: int = 4, max_tokens: int = 5
    ) -> None:
        self.answers, self.wrong_every, self.max_tokens = answers, wrong_every, max_tokens
        self.limits: list[int] = []

    def propose(self, seq: Any, limit: int) -> list[int]:
        self.limits.append(limit)
        answer = self.answers.get((tuple(seq.token_ids[: seq.num_prompt_tokens]), seq.index), [])
        done = seq.num_output_tokens
        if seq.output_token_ids != answer[:done]:
            return []
        return [
            token + 1 if (done + i) % self.wrong_every == self.wrong_every - 1 else token
            for i, token in enumerate(answer[done : done + min(limit, self.max_tokens)])
        ]
