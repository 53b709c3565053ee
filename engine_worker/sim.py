"""A torch-free stand-in engine: deterministic words at a fixed rate, so the edge and the broker can be
load-tested (and scaled across many sim workers) without a model. Same interface as the real engine.

Each running sequence gets one token per step; steps are paced at `tokens_per_s`. Token ids are a pure
function of (seed, choice, position), so two runs of the same request produce the same text. Stop strings
and penalties are ignored (there is nothing to sample)."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from broker.artifacts import directory_in_place
from contracts import ChoiceDelta, DeviceInfo, EmbedRequest, FinishReason, GenerateRequest, Usage
from engine_worker.outputs import EmbedOutput, RequestOutput
from engine_worker.validation import ContextLengthExceeded, InvalidRequest

SPECIALS = ("<unk>", "<s>", "</s>")
SIM_MAX_MODEL_LEN = 4096
CHAT_TEMPLATE = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}assistant:"


@dataclass(frozen=True, slots=True)
class SimConfig:
    max_num_seqs: int = 256
    tokens_per_s: float = 20.0
    vocab_size: int = 32000  # covers the id range `inferq bench` sends
    max_model_len: int = SIM_MAX_MODEL_LEN

    def __post_init__(self) -> None:
        if self.tokens_per_s <= 0 or self.vocab_size <= len(SPECIALS) or self.max_num_seqs < 1:
            raise ValueError("sim engine needs tokens_per_s > 0, vocab_size > 3 and max_num_seqs >= 1")


def write_sim_tokenizer(target: Path, vocab_size: int) -> Path:
    """A word-level tokenizer (`w0 w1 …`) built in code, saved as an ordinary HF tokenizer directory so the edge
    loads it exactly as it loads a real model's."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: index for index, token in enumerate(SPECIALS)}
    vocab.update({f"w{index}": index for index in range(len(SPECIALS), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    tokenizer.chat_template = CHAT_TEMPLATE
    # Several sim workers may share a data dir: each writes aside and renames, none reads another's half-write.
    target = target.with_name(f"{target.name}-{vocab_size}")
    if not target.is_dir():
        with directory_in_place(target) as staging:
            tokenizer.save_pretrained(staging)
    return target


@dataclass(slots=True)
class _SimRequest:
    request: GenerateRequest
    max_tokens: int
    generated: list[int] = field(default_factory=list)  # per step, choices share the position

    @property
    def position(self) -> int:
        return len(self.request.resume_token_ids) + len(self.generated)

    def usage(self) -> Usage:
        """As the real engine counts: resumed tokens are completion tokens too (n > 1 is never resumed)."""
        return Usage(
            prompt_tokens=len(self.request.prompt_token_ids), completion_tokens=self.position * self.request.sampling.n
        )


class SimEngine:
    dtype_name = "none"

    def __init__(self, config: SimConfig):
        self.config = config
        self.max_model_len = config.max_model_len
        self._waiting: deque[_SimRequest] = deque()
        self._running: dict[str, _SimRequest] = {}
        self._pending: list[RequestOutput] = []  # abort notices, returned by the next step
        self._next_step = time.monotonic()

    @property
    def device_info(self) -> DeviceInfo:
        return DeviceInfo(kind="sim", name=f"simulated engine, {self.config.tokens_per_s:g} tokens/s per sequence")

    def validate(self, request: GenerateRequest | EmbedRequest) -> None:
        """Frozen limits only: safe from any thread."""
        if isinstance(request, EmbedRequest):
            raise InvalidRequest("the sim engine computes no embeddings")
        if request.constraint is not None:  # its canned words could not honour it; never pretend
            raise InvalidRequest("the sim engine cannot enforce structured outputs (constraint)")
        # As the torch engine: resumed tokens count toward max_tokens (the edge fills in an unset one).
        prompt = len(request.prompt_token_ids)
        wanted = request.sampling.max_tokens or len(request.resume_token_ids) + 1
        if prompt + wanted > self.max_model_len:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_model_len} tokens, "
                f"but the request needs {prompt + wanted}"
            )

    def embed(self, requests: list[EmbedRequest]) -> list[EmbedOutput]:
        raise InvalidRequest("the sim engine computes no embeddings")

    def add_request(self, request: GenerateRequest) -> None:
        self.validate(request)
        if request.request_id in self._running:
            raise InvalidRequest(f"request {request.request_id!r} is already running")
        rest = self.max_model_len - len(request.prompt_token_ids)
        self._waiting.append(_SimRequest(request, request.sampling.max_tokens or rest))

    def abort_request(self, request_id: str) -> None:
        waiting = [item for item in self._waiting if item.request.request_id == request_id]
        self._waiting = deque(item for item in self._waiting if item.request.request_id != request_id)
        item = self._running.pop(request_id, None) or (waiting[0] if waiting else None)
        if item is not None:
            choices = [ChoiceDelta(index=i, finish_reason=FinishReason.ABORT) for i in range(item.request.sampling.n)]
            self._pending.append(RequestOutput(request_id, choices, finished=True, usage=item.usage()))

    def has_unfinished_requests(self) -> bool:
        return bool(self._waiting or self._running or self._pending)

    def stats(self) -> None:
        return None  # the bridge's own counts describe the sim well enough

    def step(self) -> list[RequestOutput]:
        if self._pending and not self._running:
            outputs, self._pending = self._pending, []
            return outputs
        self._pace()
        while self._waiting and self._slots_used() + self._waiting[0].request.sampling.n <= self.config.max_num_seqs:
            item = self._waiting.popleft()
            self._running[item.request.request_id] = item
        outputs, self._pending = self._pending, []
        for request_id, item in list(self._running.items()):
            outputs.append(self._advance(item))
            if outputs[-1].finished:
                del self._running[request_id]
        return outputs

    def _slots_used(self) -> int:
        return sum(item.request.sampling.n for item in self._running.values())

    def _pace(self) -> None:
        interval = 1.0 / self.config.tokens_per_s
        delay = self._next_step - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        self._next_step = max(self._next_step, time.monotonic() - interval) + interval

    def _token(self, request: GenerateRequest, choice: int, position: int) -> int:
        seed = request.sampling.seed or 0
        span = self.config.vocab_size - len(SPECIALS)
        return len(SPECIALS) + (seed * 31 + choice * 7919 + position * 104729 + len(request.prompt_token_ids)) % span

    def _advance(self, item: _SimRequest) -> RequestOutput:
        request = item.request
        position = item.position
        item.generated.append(position)
        done = len(item.generated) + len(request.resume_token_ids) >= item.max_tokens
        choices = []
        for choice in range(request.sampling.n):
            token = self._token(request, choice, position)
            choices.append(
                ChoiceDelta(
                    index=choice,
                    text=f" w{token}",
                    token_ids=[token],
                    finish_reason=FinishReason.LENGTH if done else None,
                )
            )
        return RequestOutput(request.request_id, choices, finished=done, usage=item.usage() if done else None)
