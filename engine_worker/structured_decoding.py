"""Structured outputs in the engine (issue #16): one grammar matcher per constrained choice, the token masks of a
step's sampled rows, and advancing the matchers over the tokens each step keeps.

The engine core stays torch-free: masks are packed int32 NumPy rows (engine_worker/constraints.py) attached to
the sampling rows; only the sampler turns them into a logits mask.

- Admission: every choice of a constrained request (n / best_of alike) gets its own matcher, advanced over the
  request's `resume_token_ids` (a request resumed on this worker continues where the grammar was).
- Drafts (n-gram speculation): trimmed to the prefix the grammar allows before the forward pass, and masked per
  position (row j gets the mask after the first j drafts). Drafts are never consumed by the matcher here; only the
  tokens a step keeps are, so rejected drafts need no rollback.
- Masks: filled on a helper thread (llguidance releases the GIL) while the engine thread runs the forward pass;
  the sampler waits for them just before it applies them, and the step settles them before any matcher advances.
- Preemption / recompute: the matcher tracks tokens, not KV; a recomputed sequence keeps its tokens and its
  matcher, and nothing is consumed twice (only newly sampled tokens reach `advance`).

The llguidance tokenizer costs ~0.5 s to build, so it is built on the first constrained request, not at start.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import structlog

from contracts import GenerateRequest
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
from engine_worker.validation import InvalidRequest

if TYPE_CHECKING:
    from engine_worker.sampling_rows import SamplingRow
    from engine_worker.sequence import Sequence

log = structlog.get_logger(__name__)


class StructuredDecoding:
    """Owned by the engine thread (GrammarCompiler and the matchers are not thread-safe)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self._tokenizer = tokenizer
        self._vocab_size = vocab_size
        self._eos = eos_token_ids
        self._compiler: GrammarCompiler | None = None
        self._filler: MaskFiller | None = None
        # Fill masks on the mask thread, overlapping the forward pass (off: before it, as a baseline to measure).
        self.overlap = True

    @property
    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            try:
                self._compiler = GrammarCompiler.from_hf_tokenizer(
                    self._tokenizer, vocab_size=self._vocab_size, eos_token_ids=self._eos
                )
            except Exception as exc:  # a tokenizer llguidance cannot read: refuse the request, keep the engine
                log.exception("structured.tokenizer_unusable")
                raise InvalidRequest(f"this model's tokenizer cannot be used for structured outputs: {exc}") from exc
            self._filler = MaskFiller()
        return self._compiler

    def matchers(self, request: GenerateRequest, count: int) -> list[ConstraintMatcher | None]:
        """One matcher per choice (None for all when the request is unconstrained); raises InvalidRequest when
        the constraint does not compile or the resumed tokens do not fit it."""
        if request.constraint is None:
            return [None] * count
        try:
            return [self.compiler.matcher(request.constraint, replay=request.resume_token_ids) for _ in range(count)]
        except ConstraintError as exc:
            raise InvalidRequest(f"constraint: {exc}") from exc
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
