"""The engine: `step()` = schedule → run → postprocess. Synchronous, I/O-free and torch-free (the model runner
behind `executor.ModelExecutor` does the device work); the engine loop owns the thread.

Not thread-safe: every method runs on the engine thread, except `validate`, which reads frozen limits only.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from common.engine_config import EngineConfig
from contracts import EmbedRequest, FinishReason, GenerateRequest, Usage
from engine_worker.acceptance import accept_tokens
from engine_worker.executor import ModelExecutor
from engine_worker.intake import new_request_state
from engine_worker.kv_budget import size_kv_cache
from engine_worker.kv_cache import KVCacheManager
from engine_worker.output_builder import OutputBuilder
from engine_worker.outputs import EmbedOutput, EngineStats, RequestOutput
from engine_worker.prefix_caching import PrefixCaching
from engine_worker.sampling_rows import TokenLogprobData, row_for
from engine_worker.scheduler import Scheduler, SchedulerOutput
from engine_worker.sequence import RequestState, Sequence, SequenceStatus
from engine_worker.speculative import NgramProposer, Proposer, back_off, propose_drafts
from engine_worker.structured_decoding import StructuredDecoding
from engine_worker.validation import InvalidRequest, RequestLimits

if TYPE_CHECKING:
    from engine_worker.model_runner import RunOutput  # the runner's, which imports torch

__all__ = ["Engine", "EngineConfig"]

log = structlog.get_logger(__name__)

# An engine with nothing to run but grammars compiling waits this long at most per step for one to finish: short
# enough that aborts and new requests still get in promptly, long enough not to spin.
COMPILE_WAIT_S = 0.01


class Engine:
    def __init__(
        self,
        config: EngineConfig,
        tokenizer: Any,
        runner: ModelExecutor,
        eos_token_ids: set[int] | frozenset[int],
        proposer: Proposer | None = None,
    ) -> None:
        """`proposer` guesses draft tokens; by default the n-gram proposer when `num_speculative_tokens` > 0."""
        self.config = config
        self.tokenizer = tokenizer
        self.runner = runner
        self.max_model_len: int = runner.max_model_len
        self.eos_token_ids = frozenset(eos_token_ids)
        self.limits = RequestLimits(self.max_model_len, runner.vocab_size, config.max_num_seqs, runner.num_layers)
        capacity = size_kv_cache(config, runner).tokens
        self.kv = KVCacheManager(capacity, config.max_num_seqs, self.max_model_len)
        runner.allocate_kv_cache(capacity, self.kv.slot_len)
        self.prefix = (
            PrefixCaching.sized_for(self.kv, runner, config.prefix_cache_max_mib) if config.prefix_caching else None
        )
        self.scheduler = Scheduler(config.max_num_seqs, config.max_num_batched_tokens, self.kv)
        self.outputs = OutputBuilder(tokenizer)
        if proposer is None and config.num_speculative_tokens:
            proposer = NgramProposer(config.num_speculative_tokens, config.prompt_lookup_min, config.prompt_lookup_max)
        self.proposer = proposer
        self.structured = StructuredDecoding(tokenizer, runner.vocab_size, self.eos_token_ids)
        self.num_draft_tokens_total = 0
        self.num_accepted_tokens_total = 0
        self._requests: dict[str, RequestState] = {}
        self._pending: list[RequestOutput] = []  # abort outputs, returned by the next step
        self._rejected: list[tuple[str, InvalidRequest]] = []  # failed after admission (`take_rejected`)
        self._arrivals = 0
        self._seq_ids = itertools.count(1)
        log.info(
            "engine ready",
            max_model_len=self.max_model_len,
            kv_cache_tokens=capacity,
            max_num_seqs=config.max_num_seqs,
        )

    @classmethod
    def from_pretrained(cls, model_dir: str | Path, config: EngineConfig) -> Engine:
        from engine_worker.runner_factory import load_model

        return cls(config, *load_model(model_dir, config))

    # --- introspection --------------------------------------------------------------------------------------
    @property
    def device(self) -> str:
        """The torch device string, e.g. "cpu" or "cuda:0"."""
        return self.runner.device_name

    @property
    def dtype_name(self) -> str:
        return self.runner.dtype_name

    def compiled_decode_state(self) -> str | None:
        """Whether small steps run compiled yet ("compiling", "ready", "failed"; None without a compiled step).
        Safe from any thread: the worker announces it."""
        return self.runner.compiled_decode_state()

    def stats(self) -> EngineStats:
        running = sum(1 for s in self._requests.values() if any(q.status is SequenceStatus.RUNNING for q in s.seqs))
        queries, hits = self.prefix.stats if self.prefix is not None else (None, None)
        return EngineStats(
            running=running,
            waiting=len(self._requests) - running,
            kv_cache_usage=self.kv.usage,
            preemptions=self.scheduler.num_preemptions,
            draft_tokens=self.num_draft_tokens_total,
            accepted_tokens=self.num_accepted_tokens_total,
            prefix_cache_queries=queries,
            prefix_cache_hits=hits,
        )

    def has_unfinished_requests(self) -> bool:
        return bool(self._requests or self._pending)

    def release_idle_memory(self) -> None:
        """Called by the engine loop after a while without requests: the KV cache's pages go back to the OS."""
        if not self.has_unfinished_requests():
            self.runner.release_kv_memory()

    # --- intake ---------------------------------------------------------------------------------------------
    def validate(self, request: GenerateRequest | EmbedRequest) -> None:
        """Raises `InvalidRequest` for a request this engine can never serve. Reads frozen limits only, so any
        thread may call it."""
        self.limits.check(request)

    def embed(self, requests: list[EmbedRequest]) -> list[EmbedOutput]:
        """Pooled hidden states, computed at once outside the KV cache (between two steps)."""
        outputs = []
        for request in requests:
            self.limits.check_embed(request)
            usage = Usage(prompt_tokens=sum(len(tokens) for tokens in request.inputs))
            outputs.append(EmbedOutput(request.request_id, self.runner.pooled_vectors(request), usage))
        return outputs

    def add_request(self, request: GenerateRequest) -> None:
        self.limits.check_generate(request)
        if request.request_id in self._requests:
            raise InvalidRequest(f"request {request.request_id!r} is already running")
        count = request.sampling.num_candidates
        matchers = self.structured.matchers_now(request, count)
        cache_keys = self.prefix.keys(request) if self.prefix is not None else []
        self._arrivals += 1
        state = new_request_state(
            request,
            self.tokenizer,
            self.eos_token_ids,
            self.max_model_len,
            matchers or [None] * count,
            cache_keys,
            self._arrivals,
            self._seq_ids,
        )
        self._requests[request.request_id] = state
        if matchers is None:
            self.structured.wait_for_grammar(state)  # `_admit_compiled` schedules it once compiled
        else:
            for seq in state.seqs:
                self.scheduler.add(seq)

    def take_rejected(self) -> list[tuple[str, InvalidRequest]]:
        """Requests failed after `add_request` returned (their grammar did not compile, or their resumed tokens do
        not fit it), with the reason; each is handed out once, and nothing else is ever reported for it."""
        rejected, self._rejected = self._rejected, []
        return rejected

    def abort_request(self, request_id: str) -> None:
        state = self._requests.pop(request_id, None)
        if state is None:
            return
        unfinished = [seq for seq in state.seqs if not seq.is_finished]
        for seq in unfinished:
            self._finish(seq, FinishReason.ABORT, None)
        self._pending.append(self.outputs.aborted(state, unfinished))

    # --- the loop -------------------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """One iteration: schedule → run → postprocess. Returns what each request has new (and pending aborts)."""
        outputs, self._pending = self._pending, []
        self._admit_compiled()
        batch = self._schedule()
        if batch.is_empty:
            if not outputs:  # nothing to run but grammars compiling: wait for one rather than spin
                self.structured.wait_for_compiles(COMPILE_WAIT_S)
            return outputs
        sample_seqs = [seq for seq, n in batch.scheduled if seq.num_computed_tokens + n >= seq.num_tokens]
        result = self._run(batch, sample_seqs)
        self.scheduler.postprocess(batch)
        for seq, entries in result.prompt_logprobs.items():
            self.outputs.add_prompt_logprobs(self._requests[seq.request_id], seq, entries)
        sampled = iter(zip(result.sampled.token_ids, result.sampled.logprobs, strict=True))
        for seq in sample_seqs:
            self._accept(seq, list(itertools.islice(sampled, len(seq.draft_token_ids) + 1)))
        return outputs + self._collect_outputs(sample_seqs)

    def _admit_compiled(self) -> None:
        """Requests whose grammar compiled since the last step join the scheduler (in their arrival order, which
        they keep); those it failed are rejected. A request aborted meanwhile is gone already."""
        for state, matchers in self.structured.compiled():
            if self._requests.get(state.request_id) is not state:
                continue  # aborted while its grammar compiled (its id may even be in use again)
            if isinstance(matchers, InvalidRequest):
                del self._requests[state.request_id]
                for seq in state.seqs:
                    self.scheduler.finish(seq)  # never scheduled: this only marks it finished
                self._rejected.append((state.request_id, matchers))
                continue
            for seq, matcher in zip(state.seqs, matchers, strict=True):
                seq.matcher = matcher
                self.scheduler.add(seq)

    def _schedule(self) -> SchedulerOutput:
        """Drafts for the running decodes (trimmed to what their grammars allow), then the batch and its KV moves."""
        if self.proposer is not None:
            propose_drafts(self.proposer, self.scheduler.running, self.config.speculative_max_rows, self.max_model_len)
            self.structured.trim_drafts(self.scheduler.running)
        batch = self.scheduler.schedule()
        self._prepare_cache(batch)
        return batch

    def _run(self, batch: SchedulerOutput, sample_seqs: list[Sequence]) -> RunOutput:
        """The forward pass and sampling: one row per draft position and one after the drafts, per sequence;
        grammar masks are filled while the forward pass runs."""
        rows, constrained = [], []
        for seq in sample_seqs:
            if seq.matcher is not None:
                constrained.append((seq, len(rows)))
            rows += [row_for(seq, seq.draft_token_ids[:j]) for j in range(len(seq.draft_token_ids) + 1)]
        masks = self.structured.mask_rows(rows, constrained)
        try:
            return self.runner.run(batch.scheduled, sample_seqs, rows, self._prompt_logprobs_wanted(batch))
        finally:
            if masks is not None:
                masks.settle()  # the mask thread is done with the matchers before _accept advances them

    def _prepare_cache(self, batch: SchedulerOutput) -> None:
        """Carry out the KV moves the scheduler decided: a new slot length, cached prefixes into their new slots,
        prompt copies for n > 1 (which may copy a prefix just loaded)."""
        if batch.relayout is not None:
            self.runner.relayout(batch.relayout)
        if self.prefix is not None:
            self.prefix.load(batch.cache_loads)
        if batch.forks:
            self.runner.copy_prefixes([(src.slot, dst.slot, n) for src, dst, n in batch.forks])

    def _prompt_logprobs_wanted(self, batch: SchedulerOutput) -> dict[Sequence, tuple[int, int]]:
        """seq -> (top-k, first prompt position still missing) for the sequences whose prompt logprobs are due."""
        wanted = {}
        for seq, _ in batch.scheduled:
            if seq.needs_prompt_logprobs and not (state := self._requests[seq.request_id]).prompt_logprobs_ready:
                assert state.prompt_logprobs is not None
                wanted[seq] = (seq.params.prompt_logprobs, len(state.prompt_logprobs) - 1)
        return wanted

    def _accept(self, seq: Sequence, sampled: list[tuple[int, TokenLogprobData | None]]) -> None:
        accepted = accept_tokens(seq, sampled, self.outputs, self.structured, self.max_model_len)
        if accepted.finish is not None:
            self._finish(seq, *accepted.finish)
        if accepted.drafts:
            self.num_draft_tokens_total += accepted.drafts
            self.num_accepted_tokens_total += accepted.matched
            back_off(seq, accepted.matched)
        self.scheduler.reject_drafts(seq, accepted.drafts - accepted.matched)

    def _finish(self, seq: Sequence, reason: FinishReason, stop_reason: str | int | None) -> None:
        slot = seq.slot
        self.scheduler.finish(seq)
        if self.prefix is not None and slot is not None:
            self.prefix.save(seq, slot)  # after its slot is freed: the room it held may now cache its prompt
        seq.finish_reason, seq.stop_reason = reason, stop_reason

    def _collect_outputs(self, sample_seqs: list[Sequence]) -> list[RequestOutput]:
        outputs = []
        for request_id in dict.fromkeys(seq.request_id for seq in sample_seqs):
            state = self._requests[request_id]
            output = self.outputs.output(state)
            if output is not None:
                outputs.append(output)
            if output is not None and output.finished:
                del self._requests[request_id]
        return outputs
