"""Edge validation of a structured-output constraint before it is queued: an invalid JSON schema, regex or grammar
is a 400 naming what is wrong, never a worker-side failure (issue #16; chat and completions call
`check_before_queueing` for `response_format` / `structured_outputs`, see docs/structured-outputs.md).

Validation compiles the very grammar a worker will (contracts/grammar.py) under llguidance's resource limits, so
the edge refuses what a worker would. Sizes are already bounded by the wire models (contracts/constraints.py).
llguidance releases the GIL while it compiles, so callers run this in a thread (`asyncio.to_thread`), and the app's
`StructuredValidation` remembers what compiled, by `constraint_key`: SDKs send the same schema on every request.

Measured on this repo's 2-core CPU: a 7-property invoice schema with nested objects, an array of objects, a
pattern, formats, enums and anyOf costs 1.6-2.4 ms CPU median, 3 ms p99 (wall-clock p99 17-24 ms at load
average 8, i.e. waiting for a core); tests/api/test_structured.py asserts the CPU p99 < 20 ms. Integer ranges are
the expensive keyword (~1 ms each): a 64 KiB schema of only ranges takes ~0.8 s and hits the time backstop.
"""

from __future__ import annotations

import asyncio
import time
from collections import OrderedDict
from collections.abc import Sequence

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from api.errors import ApiError
from api.grammar_termination import unproductive_rules
from api.validation_metrics import ValidationMeter
from contracts import ErrorCode
from contracts.constraints import Constraint, GrammarConstraint, JsonSchemaConstraint, constraint_key
from contracts.grammar import grammar_for, parser_limits

# Compile budget: llguidance's own limits (contracts/grammar.py, shared with the workers) are deterministic work
# counters; the validating thread's CPU time is checked after the fact as a backstop. CPU, not wall time: on a busy
# machine a thread waits for a core, and 32 concurrent validations of a valid 12 KiB schema took over 0.5 s of wall
# time each there (scripts/structured_edge_validation.py), which must not turn a valid schema into a 400.
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
    started = time.thread_time()  # llguidance compiles on this thread (without the GIL): its CPU time counts
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
    elapsed = time.thread_time() - started
    if elapsed > MAX_COMPILE_SECONDS:
        raise ApiError(
            ErrorCode.INVALID_REQUEST,
            f"{param or 'constraint'}: the {_WHAT[constraint.type]} is too complex (compiling it took "
            f"{elapsed:.2f} s of CPU, the limit is {MAX_COMPILE_SECONDS} s); simplify it",
            param=param,
        )


VALIDATED_CACHE_SIZE = 4096  # constraint keys an edge remembers as valid (64-character digests: <1 MiB in all)


class StructuredValidation:
    """One per app (`Services.structured_validation`), used on the event loop only: validates constraints before
    they are queued, in a worker thread; remembers the ones that compiled by `constraint_key`, so a client that
    sends the same schema or tools on every request (as SDKs and agent loops do) pays once, and requests that ask
    for a schema while it is being validated wait for that one validation; times every check, hits included
    (`inferq:structured_validation_seconds`). Only success is remembered: a refusal is re-checked each time (it
    names the request's own field; bad input is not what a well-behaved client repeats)."""

    def __init__(self, meter: ValidationMeter | None = None, cache_size: int = VALIDATED_CACHE_SIZE) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        self.meter = meter
        self._valid: OrderedDict[str, None] = OrderedDict()  # LRU of constraint keys that compiled
        self._cache_size = cache_size
        self._in_flight: dict[str, asyncio.Task[None]] = {}  # constraint key -> its validation

    async def check(self, constraints: Sequence[tuple[Constraint, str]]) -> None:
        """Each (constraint, param) must compile as a worker will compile it; ApiError(invalid_request) naming the
        first, in order, that does not."""
        if not constraints:
            return
        started = time.perf_counter()
        try:
            await self._check(constraints)
        finally:
            if self.meter is not None:
                self.meter.observe(time.perf_counter() - started)

    async def _check(self, constraints: Sequence[tuple[Constraint, str]]) -> None:
        # The digest is computed here, on the loop: tens of microseconds for a large schema, and a hit then
        # needs no hop to a thread (the hop is what a busy machine makes slow).
        todo = []
        for constraint, param in constraints:
            key = constraint_key(constraint)
            if key in self._valid:
                self._valid.move_to_end(key)
            else:
                todo.append((constraint, param, self._validation(key, constraint, param)))
        if self.meter is not None:
            self.meter.count_lookups(hits=len(constraints) - len(todo), misses=len(todo))
        for constraint, param, validation in todo:
            try:
                # Shielded: a client that goes away does not cancel what other requests may be waiting for.
                await asyncio.shield(validation)
            except ApiError as exc:
                if exc.info.param == param:
                    raise
                # Another request's validation of the same constraint, refused under its own field: name ours.
                await asyncio.to_thread(validate_constraint, constraint, param=param)

    def _validation(self, key: str, constraint: Constraint, param: str) -> asyncio.Task[None]:
        task = self._in_flight.get(key)
        if task is None:
            task = asyncio.create_task(asyncio.to_thread(validate_constraint, constraint, param=param))
            self._in_flight[key] = task
            task.add_done_callback(lambda done: self._settled(key, done))
        return task

    def _settled(self, key: str, task: asyncio.Task[None]) -> None:
        del self._in_flight[key]
        if not task.cancelled() and task.exception() is None:  # exception() also marks a refusal as seen
            self._valid[key] = None
            if len(self._valid) > self._cache_size:
                self._valid.popitem(last=False)


async def check_before_queueing(
    constraint: Constraint | None, param: str, validation: StructuredValidation | None = None
) -> None:
    """Validate off the event loop (llguidance releases the GIL while compiling); no-op without a constraint.
    `validation`: the app's (its cache and its meter); without one the constraint is compiled every time."""
    if constraint is None:
        return
    await (validation or StructuredValidation()).check([(constraint, param)])
