"""Whether an engine can ever serve a request, decided from frozen numbers only (`RequestLimits`), so the bridge
may ask from the asyncio thread while the engine thread steps. The errors are typed: each carries the
`ErrorCode` the edge answers with, so nobody has to read an exception's text to pick one."""

from __future__ import annotations

from dataclasses import dataclass

from contracts import EmbedRequest, ErrorCode, GenerateRequest


class InvalidRequest(ValueError):
    """A request no worker of this model can serve; never retried elsewhere."""

    code = ErrorCode.INVALID_REQUEST


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested tokens do not fit in the model's context."""

    code = ErrorCode.CONTEXT_LENGTH_EXCEEDED


def error_code(exc: Exception) -> ErrorCode:
    return exc.code if isinstance(exc, InvalidRequest) else ErrorCode.INVALID_REQUEST


def resolve_layer(layer: int, num_layers: int) -> int:
    """0 is the token embeddings, `num_layers` the last block's output; negative counts from the end."""
    resolved = layer + num_layers + 1 if layer < 0 else layer
    if not 0 <= resolved <= num_layers:
        raise InvalidRequest(
            f"layer {layer} does not exist: the model has layers 0..{num_layers} (or -1..-{num_layers + 1})"
        )
    return resolved


@dataclass(frozen=True, slots=True)
class RequestLimits:
    """What a loaded model and its engine configuration admit; fixed once the engine is built."""

    max_model_len: int
    vocab_size: int
    max_num_seqs: int
    num_layers: int

    def check(self, request: GenerateRequest | EmbedRequest) -> None:
        """Raises `InvalidRequest` (with the numbers) for a request this engine can never serve."""
        if isinstance(request, EmbedRequest):
            self.check_embed(request)
        else:
            self.check_generate(request)

    def check_generate(self, request: GenerateRequest) -> None:
        params = request.sampling
        prompt, resume = len(request.prompt_token_ids), len(request.resume_token_ids)
        if resume and params.num_candidates > 1:
            raise InvalidRequest("resume_token_ids is only supported with n=1 and no best_of")
        for name, ids in (
            ("prompt_token_ids", request.prompt_token_ids),
            ("resume_token_ids", request.resume_token_ids),
            ("stop_token_ids", params.stop_token_ids),
            ("logit_bias", list(params.logit_bias)),
        ):
            self._check_ids(ids, f"{name}: token id")
        if params.num_candidates > self.max_num_seqs:
            raise InvalidRequest(f"{params.num_candidates} choices exceed max_num_seqs ({self.max_num_seqs})")
        # Resumed tokens count toward max_tokens; None means "the rest of the context" (at least one token).
        needed = prompt + (params.max_tokens if params.max_tokens is not None else resume + 1)
        if needed > self.max_model_len:
            raise ContextLengthExceeded(
                f"this model's maximum context length is {self.max_model_len} tokens, but the request has "
                f"{prompt} prompt tokens and {resume} resumed tokens and asks for max_tokens={params.max_tokens} "
                f"({needed} tokens in total)"
            )
        if params.max_tokens is not None and resume >= params.max_tokens:
            raise InvalidRequest(f"resume_token_ids ({resume}) already reach max_tokens ({params.max_tokens})")
        if params.min_tokens > self.max_model_len - prompt:
            raise InvalidRequest(f"min_tokens ({params.min_tokens}) exceeds the {self.max_model_len - prompt} left")

    def check_embed(self, request: EmbedRequest) -> None:
        for layer in request.layers:
            resolve_layer(layer, self.num_layers)
        for tokens in request.inputs:
            if not tokens:
                raise InvalidRequest("inputs must not be empty")
            if len(tokens) > self.max_model_len:
                raise ContextLengthExceeded(
                    f"this model's maximum context length is {self.max_model_len} tokens, but an input has "
                    f"{len(tokens)}"
                )
            self._check_ids(tokens, "token id")

    def _check_ids(self, ids: list[int], what: str) -> None:
        bad = next((t for t in ids if not 0 <= t < self.vocab_size), None)
        if bad is not None:
            raise InvalidRequest(f"{what} {bad} is outside the vocabulary [0, {self.vocab_size})")
