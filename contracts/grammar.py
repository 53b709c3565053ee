"""The one translation of a wire constraint into an llguidance grammar, shared by the edge (which validates it before
queueing, api/structured.py) and the workers (which compile it to token masks, engine_worker/constraints.py), so
both judge the very same grammar. Pure string work; not imported by `contracts/__init__` so that a direct NATS
publisher that only needs the messages does not load llguidance.

JSON whitespace is bounded here, for every JSON constraint: between tokens a generation may put nothing, one
space, or one newline plus up to `JSON_MAX_INDENT` spaces/tabs. A sampled model can then not run on in endless
whitespace, while pretty-printed output (which small models prefer) stays possible. These options are applied
as llguidance *overrides*, after a schema's own `x-guidance` settings, so a client cannot lift the bound.
"""

from __future__ import annotations

import json
from typing import Any

import llguidance

from contracts.constraints import (
    ChoiceConstraint,
    Constraint,
    GrammarConstraint,
    JsonObjectConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
)

JSON_MAX_INDENT = 24
JSON_WHITESPACE_PATTERN = rf"(?:\n[ \t]{{0,{JSON_MAX_INDENT}}}| )"
# Pinned: the separators are regexes in llguidance, so a schema's x-guidance could otherwise unbound them.
JSON_OPTIONS: dict[str, Any] = {
    "whitespace_pattern": JSON_WHITESPACE_PATTERN,
    "item_separator": ",",
    "key_separator": ":",
}
ANY_JSON_OBJECT: dict[str, Any] = {"type": "object"}
# llguidance's resource limits, below its defaults (lexer fuel ~50k/ms): what the edge validates under is what a
# worker compiles under, so a grammar the edge accepted never fails on a worker for being too large.
PARSER_LIMITS: dict[str, int] = {
    "initial_lexer_fuel": 500_000,
    "max_grammar_size": 200_000,
    "max_lexer_states": 100_000,
}


def parser_limits() -> llguidance.LLParserLimits:
    return llguidance.LLParserLimits(**PARSER_LIMITS)


def json_schema_grammar(schema: dict[str, Any], *, strict: bool = True) -> str:
    """strict=False maps to llguidance's `lenient` mode: schema keywords it cannot enforce are ignored."""
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides={**JSON_OPTIONS, "lenient": not strict})


def choice_grammar(choices: list[str]) -> str:
    # JSON string literals are valid Lark literals (llguidance reads them with JSON escapes).
    return llguidance.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in choices))


def grammar_for(constraint: Constraint) -> str:
    """The llguidance grammar (a JSON string) for the constraint. Raises ValueError when the text cannot even be
    translated (a GBNF grammar that does not convert); every other error is found by validating the result."""
    match constraint:
        case JsonSchemaConstraint(json_schema=schema, strict=strict):
            return json_schema_grammar(schema, strict=strict)
        case JsonObjectConstraint():
            return json_schema_grammar(ANY_JSON_OBJECT)
        case RegexConstraint(pattern=pattern):
            return llguidance.LLMatcher.grammar_from_regex(pattern)
        case ChoiceConstraint(choices=choices):
            return choice_grammar(choices)
        case GrammarConstraint(grammar=text):
            return llguidance.grammar_from("grammar", text)
    raise TypeError(f"unknown constraint {type(constraint).__name__}")
