"""Natural-language chat workloads (`--workload realistic` and `--workload multiturn`): what a person chatting
sends, from text kept in the repo (ops/bench/data), picked deterministically from the seed.

`realistic`: one user question per request. `multiturn`: conversations that share one long system prompt; each
turn after the first appends the previous answer and a follow-up question, as a chat client resends history.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from functools import cache
from importlib.resources import files
from typing import Any

Message = dict[str, str]


@cache
def _lines(name: str) -> tuple[str, ...]:
    text = files("ops.bench").joinpath("data", name).read_text(encoding="utf-8")
    return tuple(line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#"))


def questions() -> tuple[str, ...]:
    return _lines("questions.txt")


def followups() -> tuple[str, ...]:
    return _lines("followups.txt")


@cache
def system_prompt() -> str:
    return files("ops.bench").joinpath("data", "system_prompt.txt").read_text(encoding="utf-8").strip()


def _rng(seed: int, index: int, what: str) -> random.Random:
    return random.Random(f"inferq-bench:{what}:{seed}:{index}")  # str seeds hash with sha512: stable across runs


@dataclass(frozen=True, slots=True)
class ChatRequest:
    """One chat request: its messages and the sampling seed both servers get for it."""

    messages: tuple[Message, ...]
    seed: int
    conversation: int | None = None
    turn: int | None = None  # 1 for a conversation's first request


def question_for(seed: int, index: int) -> str:
    """The index-th question: a seeded shuffle of the list, so consecutive indices differ until it wraps."""
    pool = questions()
    order = list(range(len(pool)))
    random.Random(f"inferq-bench:order:{seed}:{index // len(pool)}").shuffle(order)
    return pool[order[index % len(pool)]]


def realistic_requests(seed: int, count: int, *, first_index: int = 0) -> list[ChatRequest]:
    """`count` single-question chats; the same (seed, index) always gives the same question and sampling seed."""
    return [
        ChatRequest(
            messages=({"role": "user", "content": question_for(seed, index)},),
            seed=_rng(seed, index, "sample").randrange(2**31),
        )
        for index in range(first_index, first_index + count)
    ]


@dataclass(slots=True)
class Conversation:
    """A chat of `turns` user messages under the shared system prompt; `answers` grows as replies arrive."""

    index: int
    user_turns: tuple[str, ...]
    seed: int
    answers: list[str] = field(default_factory=list)

    @property
    def turns(self) -> int:
        return len(self.user_turns)

    def request(self, turn: int) -> ChatRequest:
        """The request for `turn` (1-based): the system prompt, every earlier exchange, then this question.
        Needs the answers of the turns before it."""
        if not 1 <= turn <= self.turns:
            raise ValueError(f"turn {turn} outside 1..{self.turns}")
        if len(self.answers) < turn - 1:
            raise ValueError(f"turn {turn} needs {turn - 1} answers, have {len(self.answers)}")
        messages: list[Message] = [{"role": "system", "content": system_prompt()}]
        for question, answer in zip(self.user_turns[: turn - 1], self.answers, strict=False):
            messages += [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        messages.append({"role": "user", "content": self.user_turns[turn - 1]})
        return ChatRequest(tuple(messages), seed=self.seed + turn, conversation=self.index, turn=turn)


def conversations(seed: int, count: int, turns: int, *, first_index: int = 0) -> list[Conversation]:
    """`count` conversations: an opening question, then follow-ups drawn without repeats."""
    pool = followups()
    result = []
    for index in range(first_index, first_index + count):
        rng = _rng(seed, index, "conversation")
        picks = rng.sample(pool, k=min(turns - 1, len(pool)))
        picks += [rng.choice(pool) for _ in range(turns - 1 - len(picks))]
        result.append(Conversation(index, (question_for(seed, index), *picks), seed=rng.randrange(2**31)))
    return result


def chat_payload(request: ChatRequest, model: str, output_len: int, temperature: float) -> dict[str, Any]:
    """The streaming /v1/chat/completions body, the same for inferq and a peer: exactly `output_len` tokens
    (`ignore_eos`, which llama.cpp's server and vLLM accept too) so tok/s compares like with like."""
    payload: dict[str, Any] = {
        "model": model,
        "messages": list(request.messages),
        "max_tokens": output_len,
        "ignore_eos": True,
        "temperature": temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if temperature > 0:
        payload["seed"] = request.seed
    return payload
