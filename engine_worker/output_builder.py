"""Turning sequence state into what a request's stream gets next (vLLM's output processor): text and token
deltas since the last output, token logprobs with their text, prompt logprobs once, `best_of` selection at the
end, and usage. Runs on the engine thread right after each step; owns the token-text cache."""

from __future__ import annotations

from typing import Any

from contracts import ChoiceDelta, FinishReason, TokenLogprob, TopLogprob, Usage
from engine_worker.outputs import RequestOutput
from engine_worker.sampling_rows import TokenLogprobData
from engine_worker.sequence import RequestState, Sequence


def usage(state: RequestState, seqs: list[Sequence]) -> Usage:
    prompt_tokens = len(state.request.prompt_token_ids)
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=sum(seq.num_output_tokens for seq in seqs),
        cached_tokens=min(prompt_tokens, state.seqs[0].num_cached_tokens),
    )


class OutputBuilder:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._token_text: dict[int, str] = {}  # a vocabulary's worth at most; decoding one token is slow

    def output(self, state: RequestState) -> RequestOutput | None:
        """What is new for this request since its last output; None when nothing is."""
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
            output.usage = usage(state, returned)
        return output

    @staticmethod
    def aborted(state: RequestState, unfinished: list[Sequence]) -> RequestOutput:
        """The last output of an aborted request: "abort" for each returned choice that was still running."""
        choices = [
            ChoiceDelta(index=seq.index, finish_reason=FinishReason.ABORT)
            for seq in unfinished
            if seq.index < state.params.n
        ]
        return RequestOutput(state.request_id, choices, finished=True, usage=usage(state, state.seqs))

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

    # --- logprobs ---------------------------------------------------------------------------------------
    def token_logprob(self, token_id: int, lp: TokenLogprobData) -> TokenLogprob:
        top = [
            TopLogprob(token_id=t, token=self._token_str(t), logprob=v)
            for t, v in zip(lp.top_ids, lp.top_logprobs, strict=True)
        ]
        return TokenLogprob(
            token_id=token_id, token=self._token_str(token_id), logprob=lp.logprob, rank=lp.rank, top=top
        )

    def add_prompt_logprobs(self, state: RequestState, seq: Sequence, entries: list[TokenLogprobData]) -> None:
        collected = state.prompt_logprobs
        assert collected is not None
        for entry in entries:
            token_id = seq.token_ids[len(collected)]
            collected.append(self.token_logprob(token_id, entry))

    def _token_str(self, token_id: int) -> str:
        text = self._token_text.get(token_id)
        if text is None:
            text = self._token_text[token_id] = self.tokenizer.decode([token_id])
        return text
