"""Structured outputs in the engine (issue #16): one grammar matcher per constrained choice, the token masks of a
step's sampled rows, and advancing the matchers over the tokens each step keeps.

The engine core stays torch-free: masks are packed int32 NumPy rows (engine_worker/constraints.py) attached to
the sampling rows; only the sampler turns them into a logits mask.

- Admission: every choice of a constrained request (n / best_of alike) gets its own matcher, advanced over the
  request's `resume_token_ids` (a request resumed on this worker continues where the grammar was). A cached
  grammar is copied at once; one not compiled yet is compiled on a compile thread (grammar_compiles.py) while the
  request waits unscheduled and the batch keeps stepping; a compile error fails that request only.
- Drafts (n-gram speculation): trimmed to the prefix the grammar allows before the forward pass, and masked per
  position (row j gets the mask after the first j drafts). Drafts are never consumed by the matcher here; only the
  tokens a step keeps are, so rejected drafts need no rollback.
- Masks: filled on a helper thread (llguidance releases the GIL) while the engine thread runs the forward pass;
  the sampler waits for them just before it applies them, and the step settles them before any matcher advances.
- Preemption / recompute: the matcher tracks tokens, not KV; a recomputed sequence keeps its tokens and its
  matcher, and nothing is consumed twice (only newly sampled tokens reach `advance`).

The llguidance tokenizer costs ~0.5 s to build, so it is built on the first constrained request, not at start, on
the compile thread (llguidance holds the GIL while it builds a tokenizer, unlike a grammar, so that one-off build
still slows the engine thread; every later compile runs without the GIL).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import llguidance
import structlog

from contracts import GenerateRequest
from contracts.constraints import Constraint, constraint_key
from engine_worker.constraints import (
    ConstraintError,
    ConstraintMatcher,
    ConstraintViolation,
    GrammarCompiler,
    MaskFiller,
    MaskRow,
    PendingMasks,
    allocate_bitmask,
)
from engine_worker.grammar_compiles import PendingCompiles
from engine_worker.validation import InvalidRequest

if TYPE_CHECKING:
    from engine_worker.sampling_rows import SamplingRow
    from engine_worker.sequence import RequestState, Sequence

log = structlog.get_logger(__name__)


class StructuredDecoding:
    """Owned by the engine thread (the compiled-grammar cache and the matchers are not thread-safe); only
    `GrammarCompiler.compile` runs elsewhere, on the compile threads."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = eos_token_ids
        self._compiler: GrammarCompiler | None = None
        self._filler: MaskFiller | None = None
        self._build_lock = threading.Lock()  # the compiler is built once, by whichever thread needs it first
        self._compiles = PendingCompiles(self._compile, self._store)
        # Fill masks on the mask thread, overlapping the forward pass (off: before it, as a baseline to measure).
        self.overlap = True

    @property
    def compiler(self) -> GrammarCompiler:
        """Built on first use (any thread; the engine builds it on a compile thread)."""
        compiler = self._compiler
        return compiler if compiler is not None else self._build_compiler()

    def _build_compiler(self) -> GrammarCompiler:
        with self._build_lock:
            if self._compiler is None:
                try:
                    compiler = GrammarCompiler.from_hf_tokenizer(
                        self._tokenizer, vocab_size=self._vocab_size, eos_token_ids=self._eos
                    )
                except Exception as exc:  # a tokenizer llguidance cannot read: refuse the request, keep the engine
                    log.exception("structured.tokenizer_unusable")
                    raise InvalidRequest(
                        f"this model's tokenizer cannot be used for structured outputs: {exc}"
                    ) from exc
                self._filler = MaskFiller()
                self._compiler = compiler  # last: a compiler that is set has its filler
            return self._compiler

    # --- admission ------------------------------------------------------------------------------------------
    def matchers_now(self, request: GenerateRequest, count: int) -> list[ConstraintMatcher | None] | None:
        """One matcher per choice, when they can be made at once: None each for an unconstrained request, copies
        of a cached grammar (~10 us each) for a constrained one. None when its grammar is not compiled yet: the
        request must `wait_for_grammar`. Raises InvalidRequest when the resumed tokens do not fit."""
        if request.constraint is None:
            return [None] * count
        compiler = self._compiler
        pristine = compiler.cached(constraint_key(request.constraint)) if compiler is not None else None
        if compiler is None or pristine is None:
            return None
        return self._copies(compiler, pristine, request, count)

    def wait_for_grammar(self, state: RequestState) -> None:
        """Compile the grammar of a request `matchers_now` had none for, off the engine thread; `compiled()`
        hands the request back once it is."""
        constraint = state.request.constraint
        assert constraint is not None
        self._compiles.add(state, constraint_key(constraint), constraint)

    def compiled(self) -> list[tuple[RequestState, list[ConstraintMatcher] | InvalidRequest]]:
        """The requests whose grammar compile ended, in arrival order: with one matcher per choice (the grammar
        is cached now), or the InvalidRequest that fails the request (the constraint does not compile, the
        resumed tokens do not fit it, the tokenizer cannot be used). Never blocks."""
        return [(state, self._matchers_after(state, outcome)) for state, outcome in self._compiles.finished()]

    @property
    def compiling(self) -> int:
        """Requests waiting for their grammar."""
        return len(self._compiles)

    def wait_for_compiles(self, timeout: float) -> None:
        """Block until a grammar some request waits for is compiled, or `timeout` seconds."""
        self._compiles.wait(timeout)

    def _compile(self, constraint: Constraint) -> llguidance.LLMatcher:
        """On a compile thread."""
        return self.compiler.compile(constraint)

    def _store(self, key: str, pristine: llguidance.LLMatcher) -> None:
        self.compiler.store(key, pristine)

    def _matchers_after(
        self, state: RequestState, outcome: llguidance.LLMatcher | Exception
    ) -> list[ConstraintMatcher] | InvalidRequest:
        if isinstance(outcome, InvalidRequest):
            return outcome
        if isinstance(outcome, ConstraintError):
            return InvalidRequest(f"constraint: {outcome}")
        if isinstance(outcome, Exception):
            raise outcome  # a bug, not bad input: as loud as it would be on the engine thread
        try:
            return self._copies(self.compiler, outcome, state.request, len(state.seqs))
        except InvalidRequest as exc:
            return exc

    @staticmethod
    def _copies(
        compiler: GrammarCompiler, pristine: llguidance.LLMatcher, request: GenerateRequest, count: int
    ) -> list[ConstraintMatcher]:
        try:
            return [compiler.matcher_from(pristine, replay=request.resume_token_ids) for _ in range(count)]
        except ConstraintViolation as exc:
            raise InvalidRequest(f"resume_token_ids do not fit the constraint: {exc}") from exc

    @staticmethod
    def trim_drafts(seqs: Iterable[Sequence]) -> None:
        """Keep only the leading drafts the grammar allows: no verify row is spent on a refused token."""
        for seq in seqs:
            if seq.matcher is not None and seq.draft_token_ids:
                del seq.draft_token_ids[seq.matcher.validate_draft(seq.draft_token_ids) :]

    def mask_rows(self, rows: list[SamplingRow], constrained: list[tuple[Sequence, int]]) -> PendingMasks | None:
        """Attach the allowed-token bitmask to each row of a constrained sequence. `constrained`: (sequence, its
        first row); its rows are first_row .. first_row + len(drafts).

        The masks are filled on the mask thread while the caller runs the forward pass (the sampler waits for
        them, `MaskRow.bits`); the caller must `settle()` what this returns before it touches a matcher again.
        With `overlap` off they are filled here, before returning."""
        if not constrained:
            return None
        compiler = self.compiler
        assert self._filler is not None
        masks = allocate_bitmask(len(rows), compiler.vocab_size)
        work = [(seq.matcher, first, seq.draft_token_ids) for seq, first in constrained if seq.matcher is not None]
        if self.overlap:
            pending = self._filler.start_with_drafts(masks, work, compiler.vocab_size)
        else:
            self._filler.fill_with_drafts(masks, work)
            pending = PendingMasks(masks, compiler.vocab_size)
        for seq, first in constrained:
            for row in range(first, first + len(seq.draft_token_ids) + 1):
                rows[row].allowed = MaskRow(pending, row)
        return pending

    @staticmethod
    def advance(seq: Sequence, token_id: int) -> bool:
        """Consume a kept token; True when the grammar is complete and allows nothing but EOS (finish now)."""
        matcher = seq.matcher
        assert matcher is not None
        try:
            matcher.consume([token_id])
        except ConstraintViolation:
            # Cannot happen for a token sampled under the mask; end the choice rather than the whole engine.
            log.error("constrained sequence sampled a refused token", request_id=seq.request_id, token_id=token_id)
            return True
        return matcher.is_stopped()
