"""What `Engine.step()` returns: one `RequestOutput` per request that has something new."""

from __future__ import annotations

from dataclasses import dataclass, field

from contracts import ChoiceDelta, EmbeddingVector, TokenLogprob, Usage


@dataclass(slots=True)
class RequestOutput:
    request_id: str
    choices: list[ChoiceDelta] = field(default_factory=list)  # only choices with new tokens or just finished
    prompt_logprobs: list[TokenLogprob | None] | None = None  # sent once, on the request's first output
    finished: bool = False  # every choice is done
    usage: Usage | None = None  # set when finished


@dataclass(slots=True)
class EmbedOutput:
    """What `Engine.embed()` returns per request: its pooled vectors and how many tokens were read."""

    request_id: str
    vectors: list[EmbeddingVector]
    usage: Usage
