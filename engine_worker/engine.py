"""The engine: `step()` = schedule → run → postprocess. Synchronous and I/O-free; the bridge owns the thread.

Not thread-safe: call every method from the one thread that runs `step()`.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from contracts import ChoiceDelta, EmbedRequest, FinishReason, GenerateRequest, TokenLogprob, TopLogprob, Usage
from engine_worker.detokenizer import IncrementalDetokenizer
from engine_worker.kv_budget import size_kv_cache
from engine_worker.kv_cache import KVCacheManager
from engine_worker.outputs import EmbedOutput, RequestOutput
from engine_worker.pooling import resolve_layer, vectors_for
from engine_worker.sampler import SamplingRow, TokenLogprobData, seed_key
from engine_worker.scheduler import Scheduler
from engine_worker.sequence import RequestState, Sequence, SequenceStatus
from engine_worker.speculative import NgramProposer, Proposer

if TYPE_CHECKING:
    from engine_worker.model_runner import ModelRunner

log = structlog.get_logger(__name__)

DEFAULT_KV_CACHE_GIB = 2.0
MAX_DRAFT_BACKOFF = 32  # tokens a sequence decodes without drafts after repeated misses, at most


@dataclass(slots=True)
class EngineConfig:
    max_num_seqs: int = 64
    """Sequences decoded together (batch slots). A request with n (or best_of) choices uses that many."""
    max_num_batched_tokens: int = 512
    """Token budget per step: decodes (1 token each) plus prefill chunks."""
    max_model_len: int | None = None
    """Cap on the context length; the model's own when None."""
    kv_cache_tokens: int | None = None
    """KV capacity in tokens. None: max_num_seqs x max_model_len, capped at `kv_cache_gib` and at a share of the
    memory available (kv_budget.py; always at least one full-length sequence). On a CPU the memory is committed
    as sequences use it, so the capacity is a ceiling, not a reservation."""
    kv_cache_gib: float = DEFAULT_KV_CACHE_GIB
    """Memory cap for the derived default of kv_cache_tokens (2 GiB: ~93k tokens of SmolLM2-135M in bf16)."""
    dtype: str = "auto"
    """auto: bfloat16 on CUDA (float16 before Ampere) and on CPUs with native bf16 (avx512_bf16/AMX), else
    float32. float32 is the correctness reference."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda, cuda:1, ..."""
    torch_threads: int | None = None
    """torch intra-op threads; torch's default if None."""
    num_speculative_tokens: int = 4
    """N-gram speculative decoding (speculative.py): draft tokens guessed per sequence and step; 0 turns it off."""
    prompt_lookup_min: int = 2
    """Shortest suffix of a sequence that the n-gram proposer looks up in its earlier text."""
    prompt_lookup_max: int = 4
    """Longest suffix looked up (longer matches are tried first)."""
    speculative_max_rows: int = 16
    """Draft only while decodes plus their drafts stay within this many rows per step: each decode gets up to
    `speculative_max_rows // decodes - 1` drafts, so speculation fades out as the batch grows (at a large batch
    the GEMMs are compute-bound and a rejected draft costs a full row)."""

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be >= 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(f"max_num_batched_tokens must be >= 1, got {self.max_num_batched_tokens}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ValueError(f"max_model_len must be >= 2, got {self.max_model_len}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise ValueError(f"kv_cache_tokens must be >= 1, got {self.kv_cache_tokens}")
        if self.kv_cache_gib <= 0:
            raise ValueError(f"kv_cache_gib must be > 0, got {self.kv_cache_gib}")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith(("cuda:", "mps", "xpu"))):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        if self.torch_threads is not None and self.torch_threads < 1:
            raise ValueError(f"torch_threads must be >= 1, got {self.torch_threads}")
        if self.num_speculative_tokens < 0:
            raise ValueError(f"num_speculative_tokens must be >= 0, got {self.num_speculative_tokens}")
        if not 1 <= self.prompt_lookup_min <= self.prompt_lookup_max:
            raise ValueError(
                f"need 1 <= prompt_lookup_min <= prompt_lookup_max, got {self.prompt_lookup_min} and "
                f"{self.prompt_lookup_max}"
            )
        if self.speculative_max_rows < 2:
            raise ValueError(f"speculative_max_rows must be >= 2, got {self.speculative_max_rows}")


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Any,
        runner: ModelRunner,
        eos_token_ids: set[int] | frozenset[int],
        proposer: Proposer | None = None,
    ) -> None:
        """`proposer` guesses draft tokens; by default the n-gram proposer when `num_speculative_tokens` > 0."""
        self.config = config
        self.tokenizer = tokenizer
        self.runner = runner
        self.max_model_len: int = runner.max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        capacity = size_kv_cache(config, runner).tokens
        self.kv = KVCacheManager(capacity, config.max_num_seqs, self.max_model_len)
        runner.allocate_kv_cache(capacity, self.kv.slot_len)
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, self.kv)
        if proposer is None and config.num_speculative_tokens:
            proposer = NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
        self.proposer = proposer
        self.num_draft_tokens_total = 0
        self.num_accepted_tokens_total = 0
        self._requests: dict[str, RequestState] = {}
        self._pending: list[RequestOutput] = []  # abort outputs, returned by the next step
        self._arrivals = 0
        self._seq_ids = 0
        self._token_text: dict[int, str] = {}
        log.info(
            "engine ready",
            max_model_len=self.max_model_len,
            kv_cache_tokens=capacity,
            max_num_seqs=config.max_num_seqs,
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: EngineConfig) -> Engine:
        from transformers import AutoTokenizer, GenerationConfig

        from engine_worker.model_runner import ModelRunner

        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        runner = ModelRunner(
            model_dir,
            device=config.device,
            dtype=config.dtype,
            max_model_len=config.max_model_len,
            torch_threads=config.torch_threads,
        )
        eos = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
        try:
            generation_eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except OSError:
            generation_eos = None
        if generation_eos is not None:
            eos |= set(generation_eos) if isinstance(generation_eos, list) else {generation_eos}
        return cls(config, tokenizer, runner, eos)

    # --- introspection --------------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        """The torch device string, e.g. "cpu" or "cuda:0"."""
        return str(self.runner.device)

    @property
    def device_description(self) -> str:
        from engine_worker.model_runner import describe_device

        return describe_device(self.runner.device)

    @property
    def dtype_name(self) -> str:
        return str(self.runner.dtype).removeprefix("torch.")

    @property
    def num_requests_running(self) -> int:
        return sum(1 for s in self._requests.values() if any(q.status is SequenceStatus.RUNNING for q in s.seqs))

    @property
    def num_requests_waiting(self) -> int:
        return len(self._requests) - self.num_requests_running

    @property
    def num_free_slots(self) -> int:
        """New requests that could start now: free sequence slots (a request with n choices takes n of them),
        and none while anything waits, so surplus work stays in the queue where every worker can see it."""
        if self.scheduler.waiting:
            return 0
        return max(0, self.kv.num_slots - len(self.scheduler.running))

    @property
    def kv_cache_usage(self) -> float:
        return self.kv.usage

    @property
    def num_preemptions_total(self) -> int:
        return self.scheduler.num_preemptions

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests or self._pending)

    def release_idle_memory(self) -> None:
        """Called by the engine loop after a while without requests: the KV cache's pages go back to the OS."""
        if not self.has_unfinished_requests():
            self.runner.release_kv_memory()

    # --- intake ---------------------------------------------------------------------------------------------
    def validate(self, request: GenerateRequest | EmbedRequest) -> None:
        """Raises ValueError (with the numbers) for a request this engine can never serve."""
        if isinstance(request, EmbedRequest):
            return self._validate_embed(request)
        params, vocab = request.sampling, self.runner.vocab_size
        prompt, resume = len(request.prompt_token_ids), len(request.resume_token_ids)
        if request.request_id in self._requests:
            raise ValueError(f"request {request.request_id!r} is already running")
        if resume and params.num_candidates > 1:
            raise ValueError("resume_token_ids is only supported with n=1 and no best_of")
        for name, ids in (
            ("prompt_token_ids", request.prompt_token_ids),
            ("resume_token_ids", request.resume_token_ids),
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", list(params.logit_bias)),
        ):
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise ValueError(f"{name} contains token id {bad[0]}, outside the vocabulary [0, {vocab})")
        if params.num_candidates > self.config.max_num_seqs:
            raise ValueError(f"{params.num_candidates} choices exceed max_num_seqs ({self.config.max_num_seqs})")
        # Resumed tokens count toward max_tokens; None means "the rest of the context" (at least one token).
        needed = prompt + (params.max_tokens if params.max_tokens is not None else resume + 1)
        if needed > self.max_model_len:
            raise ValueError(
                f"this model's maximum context length is {self.max_model_len} tokens, but the request has "
                f"{prompt} prompt tokens and {resume} resumed tokens and asks for max_tokens={params.max_tokens} "
                f"({needed} tokens in total)"
            )
        if params.max_tokens is not None and resume >= params.max_tokens:
            raise ValueError(f"resume_token_ids ({resume}) already reach max_tokens ({params.max_tokens})")
        if params.min_tokens > self.max_model_len - prompt:
            raise ValueError(f"min_tokens ({params.min_tokens}) exceeds the {self.max_model_len - prompt} left")

    def _validate_embed(self, request: EmbedRequest) -> None:
        for layer in request.layers:
            resolve_layer(layer, self.runner.num_layers)
        for tokens in request.inputs:
            if not tokens:
                raise ValueError("inputs must not be empty")
            if len(tokens) > self.max_model_len:
                raise ValueError(
                    f"this model's maximum context length is {self.max_model_len} tokens, but an input has "
                    f"{len(tokens)}"
                )
            bad = [t for t in tokens if not 0 <= t < self.runner.vocab_size]
            if bad:
                raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.runner.vocab_size})")

    def embed(self, requests: list[EmbedRequest]) -> list[EmbedOutput]:
        """Pooled hidden states, computed at once outside the KV cache (between two steps)."""
        outputs = []
        for request in requests:
            self._validate_embed(request)
            layers = list(dict.fromkeys(resolve_layer(layer, self.runner.num_layers) for layer in request.layers))
            vectors = []
            for index, tokens in enumerate(request.inputs):
                states = self.runner.hidden_states(tokens, set(layers))
                vectors += vectors_for(request, index, {layer: states[layer] for layer in layers})
            usage = Usage(prompt_tokens=sum(len(tokens) for tokens in request.inputs))
            outputs.append(EmbedOutput(request.request_id, vectors, usage))
        return outputs

    def add_request(self, request: GenerateRequest) -> None:
        self.validate(request)
        params = request.sampling
        max_tokens = params.max_tokens or self.max_model_len - len(request.prompt_token_ids)
        seed = params.seed if params.seed is not None else secrets.randbits(63)
        context = list(request.prompt_token_ids) + list(request.resume_token_ids)
        seqs = []
        self._arrivals += 1
        for index in range(params.num_candidates):
            self._seq_ids += 1
            detok = IncrementalDetokenizer(
                self.tokenizer,
                list(context),
                skip_special_tokens=params.skip_special_tokens,
                stop=tuple(params.stop),
                include_stop_str_in_output=params.include_stop_str_in_output,
            )
            seqs.append(
                Sequence(
                    seq_id=self._seq_ids,
                    request_id=request.request_id,
                    index=index,
                    token_ids=list(context),
                    num_prompt_tokens=len(request.prompt_token_ids),
                    num_resume_tokens=len(request.resume_token_ids),
                    params=params,
                    max_tokens=max_tokens,
                    sampling_key=seed_key(seed, index),
                    priority=request.priority,
                    arrival=self._arrivals,
                    eos_token_ids=self.eos_token_ids,
                    detokenizer=detok,
                )
            )
        for seq in seqs[1:]:
            seq.parent = seqs[0]
        state = RequestState(request=request, seqs=seqs)
        if params.prompt_logprobs is not None:
            state.prompt_logprobs = [None]
        self._requests[request.request_id] = state
        for seq in seqs:
            self.scheduler.add(seq)

    def abort_request(self, request_id: str) -> None:
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        choices = []
        for seq in state.seqs:
            if seq.is_finished:
                continue
            self.scheduler.finish(seq)
            seq.finish_reason = FinishReason.ABORT
            if seq.index < state.params.n:
                choices.append(ChoiceDelta(index=seq.index, finish_reason=FinishReason.ABORT))
        self._pending.append(RequestOutput(request_id, choices, finished=True, usage=self._usage(state, state.seqs)))

    # --- the loop -------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        outputs, self._pending = self._pending, []
        if self.proposer is not None:
            self._propose_drafts(self.proposer)
        batch = self.scheduler.schedule()
        if batch.relayout is not None:
            self.runner.relayout(batch.relayout)
        if batch.forks:
            self.runner.copy_prefixes([(src.slot, dst.slot, n) for src, dst, n in batch.forks])
        if batch.is_empty:
            return outputs
        sample_seqs = [seq for seq, n in batch.scheduled if seq.num_computed_tokens + n >= seq.num_tokens]
        prompt_lp = {
            seq: (seq.params.prompt_logprobs, len(self._requests[seq.request_id].prompt_logprobs) - 1)
            for seq, _ in batch.scheduled
            if seq.needs_prompt_logprobs and not self._requests[seq.request_id].prompt_logprobs_ready
        }
        rows = [self._sampling_row(seq, seq.draft_token_ids[:j]) for seq in sample_seqs
                for j in range(len(seq.draft_token_ids) + 1)]
        result = self.runner.run(batch.scheduled, sample_seqs, rows, prompt_lp)
        self.scheduler.postprocess(batch)
        for seq, entries in result.prompt_logprobs.items():
            self._add_prompt_logprobs(seq, entries)
        sampled = iter(zip(result.sampled.token_ids, result.sampled.logprobs, strict=True))
        for seq in sample_seqs:
            self._accept(seq, list(islice(sampled, len(seq.draft_token_ids) + 1)))
        touched = {seq.request_id: None for seq in sample_seqs}
        for request_id in touched:
            output = self._make_output(self._requests[request_id])
            if output is not None:
                outputs.append(output)
        return outputs

    def _propose_drafts(self, proposer: Proposer) -> None:
        """Guess draft tokens for every running decode while the step stays small enough to gain from them."""
        decodes = [seq for seq in self.scheduler.running if not seq.is_prefill]
        per_seq = self.config.speculative_max_rows // max(len(decodes), 1) - 1
        for seq in decodes:
            # Never guess past max_tokens or the context: the sampled token after the last draft must fit too.
            limit = min(per_seq, seq.max_tokens - seq.num_output_tokens - 1, self.max_model_len - seq.num_tokens)
            drafting = limit > 0 and seq.num_tokens >= seq.next_draft_at
            seq.draft_token_ids = proposer.propose(seq, limit)[:limit] if drafting else []

    def _accept(self, seq: Sequence, sampled: list[tuple[int, TokenLogprobData | None]]) -> None:
        """Keep the drafts up to the first one the sampler disagrees with, then the sampler's own token there:
        exactly the tokens decoding one at a time would have produced."""
        drafts = seq.draft_token_ids
        matched = 0
        while matched < len(drafts) and sampled[matched][0] == drafts[matched]:
            matched += 1
        for token_id, lp in sampled[: matched + 1]:
            self._append_token(seq, token_id, lp)
            if seq.is_finished:
                break
        self.num_draft_tokens_total += len(drafts)
        self.num_accepted_tokens_total += matched
        if drafts:
            # Text the proposer cannot guess (novel or randomly sampled) stops costing verify rows: each step
            # whose drafts all miss doubles the pause before the next guess; one hit ends the pause.
            seq.draft_backoff = 0 if matched else min(2 * seq.draft_backoff or 1, MAX_DRAFT_BACKOFF)
            seq.next_draft_at = seq.num_tokens + seq.draft_backoff
        self.scheduler.reject_drafts(seq, len(drafts) - matched)

    def _sampling_row(self, seq: Sequence, drafted: list[int]) -> SamplingRow:
        """How to sample the token after the sequence's tokens and the first `drafted` of its drafts."""
        p = seq.params
        num_output_tokens = seq.num_output_tokens + len(drafted)
        row = SamplingRow(
            temperature=p.temperature,
            top_p=p.top_p,
            top_k=p.top_k if p.top_k > 0 else 0,
            min_p=p.min_p,
            presence_penalty=p.presence_penalty,
            frequency_penalty=p.frequency_penalty,
            repetition_penalty=p.repetition_penalty,
            logit_bias=p.logit_bias,
            key=seq.sampling_key,
            position=seq.num_tokens + len(drafted),
            num_logprobs=p.logprobs,
            need_logprob=p.num_candidates > p.n,
        )
        if num_output_tokens < p.min_tokens:
            row.suppress_ids = tuple(p.stop_token_ids) + (() if p.ignore_eos else tuple(seq.eos_token_ids))
        if row.has_penalties:
            row.output_ids = seq.output_token_ids + drafted
            row.context_ids = seq.token_ids + drafted
        return row

    def _append_token(self, seq: Sequence, token_id: int, lp: TokenLogprobData | None) -> None:
        p = seq.params
        seq.token_ids.append(token_id)
        if lp is not None:
            seq.cumulative_logprob += lp.logprob
            if p.logprobs is not None:
                seq.logprobs.append(self._token_logprob(token_id, lp))
        can_stop = seq.num_output_tokens >= p.min_tokens
        is_eos = can_stop and not p.ignore_eos and token_id in seq.eos_token_ids
        is_stop_token = can_stop and (is_eos or token_id in p.stop_token_ids)
        stop_str = seq.detokenizer.append(
            token_id,
            check_stop=seq.num_output_tokens > p.min_tokens,
            decode=not is_stop_token or p.include_stop_str_in_output,
        )
        if is_stop_token:
            self._finish(seq, FinishReason.STOP, None if is_eos else token_id)
        elif stop_str is not None:
            self._finish(seq, FinishReason.STOP, stop_str)
        elif seq.num_output_tokens >= seq.max_tokens or seq.num_tokens >= self.max_model_len:
            self._finish(seq, FinishReason.LENGTH, None)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None) -> None:
        self.scheduler.finish(seq)
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    # --- outputs --------------------------------------------------------------------------------------------
    def _make_output(self, state: RequestState) -> RequestOutput | None:
        finished = state.finished
        if state.uses_best_of:
            if not finished:
                return None
            best = sorted(state.seqs, key=lambda s: s.cumulative_logprob, reverse=True)[: state.params.n]
            choices = [self._choice_delta(seq, index) for index, seq in enumerate(best)]
            returned = best
        else:
            choices = [c for seq in state.seqs if (c := self._choice_delta(seq, seq.index)) is not None]
            returned = state.seqs
        if not choices and not finished:
            return None
        output = RequestOutput(state.request_id, choices, finished=finished)
        if not state.prompt_logprobs_sent and state.prompt_logprobs is not None:
            output.prompt_logprobs, state.prompt_logprobs_sent = state.prompt_logprobs, True
        if finished:
            output.usage = self._usage(state, returned)
            del self._requests[state.request_id]
        return output

    def _choice_delta(self, seq: Sequence, index: int) -> ChoiceDelta | None:
        emission = seq.detokenizer.emit(finished=seq.is_finished)
        just_finished = seq.is_finished and not seq.finish_sent
        if not emission.num_tokens and not emission.text and not just_finished:
            return None
        start = seq.num_sent_tokens
        seq.num_sent_tokens += emission.num_tokens
        seq.finish_sent = seq.is_finished
        new_ids = seq.new_token_ids[start : seq.num_sent_tokens]
        logprobs = seq.logprobs[start : seq.num_sent_tokens] if seq.params.logprobs is not None else None
        return ChoiceDelta(
            index=index,
            text=emission.text,
            token_ids=new_ids,
            logprobs=logprobs,
            finish_reason=seq.finish_reason if seq.is_finished else None,
            stop_reason=seq.stop_reason if seq.is_finished else None,
        )

    @staticmethod
    def _usage(state: RequestState, seqs: list[Sequence]) -> Usage:
        return Usage(
            prompt_tokens=len(state.request.prompt_token_ids),
            completion_tokens=sum(seq.num_output_tokens for seq in seqs),
        )

    # --- logprobs -------------------------------------------------------------------------------------------
    def _token_str(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text

    def _token_logprob(self, token_id: int, lp: TokenLogprobData) -> TokenLogprob:
        top = [
            TopLogprob(token_id=t, token=self._token_str(t), logprob=v)
            for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
        ]
        return TokenLogprob(
            token_id=token_id, token=self._token_str(token_id), logprob=lp.logprob, rank=lp.rank, top=top
        )

    def _add_prompt_logprobs(self, seq: Sequence, entries: list[TokenLogprobData]) -> None:
        collected = self._requests[seq.request_id].prompt_logprobs
        assert collected is not None
        for entry in entries:
            token_id = seq.token_ids[len(collected)]
            collected.append(self._token_logprob(token_id, entry))
