"""Edge validation of a structured-output constraint before it is queued: an invalid JSON schema, regex or grammar
is a 400 naming what is wrong, never a worker-side failure (issue #16; chat and completions call
`check_before_queueing` for `response_format` / `structured_outputs`, see docs/structured-outputs.md).

Validation compiles the very grammar a worker will (contracts/grammar.py) under llguidance's resource limits, so
the edge refuses what a worker would. Sizes are already bounded by the wire models (contracts/constraints.py).
llguidance releases the GIL while it compiles, so callers run this in a thread (`asyncio.to_thread`).

Measured on this repo's 2-core CPU: a 7-property invoice schema with nested objects, an array of objects, a
pattern, formats, enums and anyOf costs 1.6-2.4 ms CPU median, 3 ms p99 (wall-clock p99 17-24 ms at load
average 8, i.e. waiting for a core); tests/api/test_structured.py asserts the CPU p99 < 20 ms. Integer ranges are
the expensive keyword (~1 ms each): a 64 KiB schema of only ranges takes ~0.8 s and hits the time backstop.
"""

from __future__ import annotations

import asyncio
import time

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from api.errors import ApiError
from api.grammar_termination import unproductive_rules
from api.validation_metrics import ValidationMeter
from contracts import ErrorCode
from contracts.constraints import Constraint, GrammarConstraint, JsonSchemaConstraint
from contracts.grammar import grammar_for, parser_limits

# Compile budget: llguidance's own limits (contracts/grammar.py, shared with the workers) are deterministic work
# counters; the wall time is checked after the fact as a backstop.
MAX_COMPILE_SECONDS = 0.5

_WHAT = {
    "json_schema": "JSON schema",
    "json_object": "JSON object",
    "regex": "regex",
    "choice": "choice",
    "grammar": "grammar",
}


def _explain(constraint: Constraint, error: str) -> str:
    error = error.strip()
    if isinstance(constraint, JsonSchemaConstraint) and "Unimplemented keys" in error:
        # llguidance names the keywords: `Unimplemented keys: ["unevaluatedProperties"]`.
        return (
            f"the JSON schema uses keywords that structured outputs cannot enforce ({error}); remove them, or "
            "set strict to false to have them ignored"
        )
    if isinstance(constraint, GrammarConstraint):
        return f"the grammar is invalid (Lark syntax with a `start` rule, or GBNF with a `root` rule): {error}"
    return f"the {_WHAT[constraint.type]} is invalid: {error}"


def validate_constraint(
    constraint: Constraint, *, param: str | None = None, tokenizer: llguidance.LLTokenizer | None = None
) -> None:
    """Raise ApiError(invalid_request) naming the problem, with `param` as the field that held the constraint.
    `tokenizer`: the model's llguidance tokenizer when the edge has one (adds token-level checks)."""
    started = time.perf_counter()
    try:
        grammar = grammar_for(constraint)
    except ValueError as exc:
        raise ApiError(
            ErrorCode.INVALID_REQUEST, f"{param or 'constraint'}: {_explain(constraint, str(exc))}", param=param
        ) from exc
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, tokenizer, limits=parser_limits())
    if is_error:
        raise ApiError(
            ErrorCode.INVALID_REQUEST, f"{param or 'constraint'}: {_explain(constraint, messages[0])}", param=param
        )
    if isinstance(constraint, GrammarConstraint) and (stuck := unproductive_rules(any_to_lark(constraint.grammar))):
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            f"{param or 'constraint'}: the grammar can never finish: every alternative of the rules "
            f"{', '.join(stuck)} needs one of them again; give one an alternative that ends",
            param=param,
        )
    elapsed = time.perf_counter() - started
    if elapsed > MAX_COMPILE_SECONDS:
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            f"{param or 'constraint'}: the {_WHAT[constraint.type]} is too complex (compiling it took "
            f"{elapsed:.2f} s, the limit is {MAX_COMPILE_SECONDS} s); simplify it",
            param=param,
        )


async def check_before_queueing(
    constraint: Constraint | None, param: str, meter: ValidationMeter | None = None
) -> None:
    """Validate off the event loop (llguidance releases the GIL while compiling); no-op without a constraint.
    `meter`: where the time it took goes (refusals included)."""
    if constraint is None:
        return
    started = time.perf_counter()
    try:
        await asyncio.to_thread(validate_constraint, constraint, param=param)
    finally:
        if meter is not None:
            meter.observe(time.perf_counter() - started)
