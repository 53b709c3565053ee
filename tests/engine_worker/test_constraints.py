"""Constrained decoding building blocks (engine_worker/constraints.py) on the real SmolLM2 tokenizer: masks that
only ever lead to valid output, EOS only where the grammar accepts, drafts, rollback and replay."""

from __future__ import annotations

import json
import random
import re
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from contracts.constraints import (
    ChoiceConstraint,
    GrammarConstraint,
    JsonObjectConstraint,
    JsonSchemaConstraint,
    RegexConstraint,
)
from contracts.grammar import JSON_MAX_INDENT
from engine_worker.constraints import (
    ConstraintError,
    ConstraintMatcher,
    ConstraintViolation,
    GrammarCompiler,
    MaskFiller,
    allocate_bitmask,
    refused_tokens,
    unpack_bitmask,
)

jsonschema_rs = pytest.importorskip("jsonschema_rs")

EOS = 2  # SmolLM2's <|endoftext|>
EXTRA_EOS = 0  # a second end token, as an engine whose generation config names more than one

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "minLength": 1, "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 130},
        "role": {"enum": ["admin", "user", "guest"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 5}, "maxItems": 3},
        "address": {
            "type": "object",
            "properties": {
                "city": {"type": "string", "maxLength": 6},
                "zip": {"type": "string", "pattern": "^[0-9]{5}$"},
            },
            "required": ["city", "zip"],
            "additionalProperties": False,
        },
        "active": {"type": "boolean"},
    },
    "required": ["name", "age", "role", "tags", "address", "active"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def hf_tokenizer(smollm2_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir)


@pytest.fixture(scope="module")
def compiler(hf_tokenizer) -> GrammarCompiler:
    return GrammarCompiler.from_hf_tokenizer(hf_tokenizer, eos_token_ids={EOS, EXTRA_EOS}, cache_size=4)


def allowed_ids(matcher: ConstraintMatcher, compiler: GrammarCompiler) -> np.ndarray:
    mask = allocate_bitmask(1, compiler.vocab_size)
    mask[0] = 0
    matcher.fill_bitmask(mask[0])
    return np.flatnonzero(unpack_bitmask(mask, compiler.vocab_size)[0])


def random_walk(
    matcher: ConstraintMatcher, compiler: GrammarCompiler, rng: random.Random, max_steps: int = 400
) -> list[int]:
    """Sample uniformly among the allowed tokens until EOS is drawn (or the grammar allows nothing else)."""
    tokens: list[int] = []
    for _ in range(max_steps):
        allowed = allowed_ids(matcher, compiler)
        assert len(allowed), "a mask must never allow nothing"
        token = int(rng.choice(allowed))
        matcher.consume([token])
        if token in (EOS, EXTRA_EOS):
            return tokens
        tokens.append(token)
    raise AssertionError(f"no EOS after {max_steps} steps: {compiler.tokenizer.decode_str(tokens)!r}")


def test_random_walks_over_the_mask_always_produce_valid_json(compiler: GrammarCompiler) -> None:
    validator = jsonschema_rs.validator_for(PERSON)
    constraint = JsonSchemaConstraint(json_schema=PERSON)
    for seed in range(12):
        matcher = compiler.matcher(constraint)
        text = compiler.tokenizer.decode_str(random_walk(matcher, compiler, random.Random(seed)))
        document = json.loads(text)
        assert validator.is_valid(document), (seed, text)
        # Bounded whitespace: at most one newline plus the indent limit between two tokens of JSON.
        assert not re.search(rf"[ \t]{{{JSON_MAX_INDENT + 2}}}", text), text
        assert "\n\n" not in text


@pytest.mark.parametrize(
    ("constraint", "check"),
    [
        (JsonObjectConstraint(), lambda text: isinstance(json.loads(text), dict)),
        (RegexConstraint(pattern=r"[0-9]{3}-[a-z]{2,4}"), lambda text: re.fullmatch(r"[0-9]{3}-[a-z]{2,4}", text)),
        (
            ChoiceConstraint(choices=["yes", "no", "maybe", "naïve ☃"]),
            lambda text: text in {"yes", "no", "maybe", "naïve ☃"},
        ),
        (
            GrammarConstraint(grammar='start: "(" num ("+" num)* ")"\nnum: /[1-9][0-9]?/'),
            lambda text: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", text),
        ),
        (GrammarConstraint(grammar='root ::= "ja" | "nein"'), lambda text: text in {"ja", "nein"}),
    ],
    ids=["json_object", "regex", "choice", "lark", "gbnf"],
)
def test_every_constraint_kind_yields_only_matching_text(compiler: GrammarCompiler, constraint, check) -> None:
    for seed in range(6):
        # json_object allows unbounded strings: stop a walk that runs long by steering it to a close.
        matcher = compiler.matcher(constraint)
        text = compiler.tokenizer.decode_str(random_walk_biased(matcher, compiler, random.Random(seed)))
        assert check(text), (seed, text)


def random_walk_biased(matcher: ConstraintMatcher, compiler: GrammarCompiler, rng: random.Random) -> list[int]:
    """Like random_walk, but after 40 steps prefer tokens that close something, so open-ended grammars end."""
    tokens: list[int] = []
    closers = {token for piece in ('"', "}", "]", '"}', "0") for token in compiler.tokenizer.tokenize_str(piece)}
    for step in range(600):
        allowed = allowed_ids(matcher, compiler)
        pick = [int(t) for t in allowed if t in closers or t in (EOS, EXTRA_EOS)] if step > 40 else []
        token = rng.choice(pick) if pick else int(rng.choice(allowed))
        matcher.consume([token])
        if token in (EOS, EXTRA_EOS):
            return tokens
        tokens.append(token)
    raise AssertionError(compiler.tokenizer.decode_str(tokens))


def test_eos_is_allowed_only_where_the_grammar_accepts(compiler: GrammarCompiler, hf_tokenizer) -> None:
    matcher = compiler.matcher(RegexConstraint(pattern="ab(cd)?"))
    trace = []
    for piece in ["a", "b", "c", "d"]:
        allowed = set(allowed_ids(matcher, compiler).tolist())
        trace.append((matcher.is_accepting(), EOS in allowed, EXTRA_EOS in allowed))
        matcher.consume(hf_tokenizer.encode(piece, add_special_tokens=False))
    assert trace == [(False, False, False), (False, False, False), (True, True, True), (False, False, False)]
    assert matcher.is_accepting() and matcher.is_stopped()
    assert set(allowed_ids(matcher, compiler).tolist()) == {EOS, EXTRA_EOS}  # only an end once nothing can follow


def test_a_token_outside_the_mask_is_refused(compiler: GrammarCompiler, hf_tokenizer) -> None:
    matcher = compiler.matcher(ChoiceConstraint(choices=["yes", "no"]))
    with pytest.raises(ConstraintViolation, match="not allowed"):
        matcher.consume(hf_tokenizer.encode("maybe", add_special_tokens=False))


def test_rollback_and_replay_restore_the_exact_masks(compiler: GrammarCompiler) -> None:
    constraint = JsonSchemaConstraint(json_schema=PERSON)
    walker = compiler.matcher(constraint)
    tokens = random_walk(walker, compiler, random.Random(7))
    assert len(tokens) > 10
    cut = len(tokens) // 2

    straight = compiler.matcher(constraint, replay=tokens[:cut])  # a resumed request: replay into a fresh matcher
    rolled = compiler.matcher(constraint, replay=tokens)  # the same prefix reached by rolling back
    rolled.rollback(len(tokens) - cut)
    assert straight.num_consumed == rolled.num_consumed == cut
    for token in tokens[cut:]:
        assert np.array_equal(allowed_ids(straight, compiler), allowed_ids(rolled, compiler))
        straight.consume([token])
        rolled.consume([token])
    assert straight.is_accepting() and rolled.is_accepting()
    with pytest.raises(ValueError, match="cannot roll back"):
        rolled.rollback(len(tokens) + 1)


@pytest.mark.parametrize(
    ("constraint", "text"),
    [(ChoiceConstraint(choices=["yes"]), "yes"), (RegexConstraint(pattern="ab(cd)?"), "ab")],
    ids=["stopped", "accepting"],
)
def test_rollback_of_an_eos_undoes_only_the_eos(compiler: GrammarCompiler, hf_tokenizer, constraint, text) -> None:
    """llguidance records an EOS consumed on a stopped grammar differently from one consumed while the grammar could
    still go on; rolling back one token must undo exactly the EOS in both cases."""
    tokens = hf_tokenizer.encode(text, add_special_tokens=False)
    matcher = compiler.matcher(constraint, replay=tokens)
    before = allowed_ids(matcher, compiler)
    matcher.consume([EOS])
    matcher.rollback(1)  # the EOS was a rejected draft
    assert matcher.is_accepting() and matcher.num_consumed == len(tokens)
    assert np.array_equal(allowed_ids(matcher, compiler), before)
    out = allocate_bitmask(2, compiler.vocab_size)
    matcher.fill_bitmasks_with_drafts(out, 0, [EOS])
    assert np.array_equal(allowed_ids(matcher, compiler), before)
    MaskFiller(1).fill_with_drafts(out, [(matcher, 0, [EOS])])
    assert np.array_equal(allowed_ids(matcher, compiler), before)


def test_a_draft_may_end_with_the_eos_the_grammar_allows(compiler: GrammarCompiler, hf_tokenizer) -> None:
    for constraint, text in ((ChoiceConstraint(choices=["yes"]), "yes"), (RegexConstraint(pattern="ab(cd)?"), "ab")):
        tokens = hf_tokenizer.encode(text, add_special_tokens=False)
        fresh = compiler.matcher(constraint)
        assert fresh.validate_draft(tokens + [EOS, EOS]) == len(tokens) + 1  # the sequence ends at the first
        assert fresh.validate_draft([EOS]) == 0  # nothing generated yet: the grammar does not accept
        assert fresh.num_consumed == 0 and not fresh.is_accepting()
        assert compiler.matcher(constraint, replay=tokens).validate_draft([EXTRA_EOS]) == 1


def test_drafts_are_validated_and_masked_per_position(compiler: GrammarCompiler, hf_tokenizer) -> None:
    constraint = JsonSchemaConstraint(json_schema=PERSON)
    matcher = compiler.matcher(constraint, replay=hf_tokenizer.encode('{"name":"Al', add_special_tokens=False))
    good = hf_tokenizer.encode('ice","age":', add_special_tokens=False)
    bad = hf_tokenizer.encode("x", add_special_tokens=False)  # a letter where a number must start
    assert matcher.validate_draft(good + bad + good) == len(good)
    assert matcher.validate_draft([]) == 0
    before = allowed_ids(matcher, compiler)

    out = allocate_bitmask(len(good) + 3, compiler.vocab_size)
    matcher.fill_bitmasks_with_drafts(out, 1, good)
    assert np.all(out[0] == -1)  # rows of other sequences are untouched
    reference = compiler.matcher(constraint, replay=hf_tokenizer.encode('{"name":"Al', add_special_tokens=False))
    unpacked = unpack_bitmask(out, compiler.vocab_size)
    for j in range(len(good) + 1):
        assert np.array_equal(np.flatnonzero(unpacked[1 + j]), allowed_ids(reference, compiler)), j
        if j < len(good):
            reference.consume([good[j]])
    assert np.array_equal(allowed_ids(matcher, compiler), before)  # the matcher is where it was
    with pytest.raises(ConstraintViolation, match="validate_draft"):
        matcher.fill_bitmasks_with_drafts(out, 0, good + bad)
    assert np.array_equal(allowed_ids(matcher, compiler), before)  # refused before anything changed


def test_the_parallel_filler_writes_what_each_matcher_would(compiler: GrammarCompiler, hf_tokenizer) -> None:
    matchers = [
        compiler.matcher(JsonSchemaConstraint(json_schema=PERSON)),
        compiler.matcher(RegexConstraint(pattern="[a-c]+")),
        compiler.matcher(ChoiceConstraint(choices=["yes", "no"])),
    ]
    filler = MaskFiller(num_threads=2)
    out = allocate_bitmask(4, compiler.vocab_size)
    filler.fill(out, [(matchers[0], 0), (matchers[1], 2), (matchers[2], 3)])
    assert np.all(out[1] == -1)
    for matcher, row in ((matchers[0], 0), (matchers[1], 2), (matchers[2], 3)):
        assert np.array_equal(
            np.flatnonzero(unpack_bitmask(out[row : row + 1], compiler.vocab_size)[0]), allowed_ids(matcher, compiler)
        )

    drafts = hf_tokenizer.encode("abc", add_special_tokens=False)
    out = allocate_bitmask(1 + len(drafts), compiler.vocab_size)
    filler.fill_with_drafts(out, [(matchers[1], 0, drafts)])
    single = allocate_bitmask(1 + len(drafts), compiler.vocab_size)
    matchers[1].fill_bitmasks_with_drafts(single, 0, drafts)
    assert np.array_equal(out, single)
    with pytest.raises(ValueError, match="int32"):
        filler.fill(out.astype(np.int64), [(matchers[0], 0)])


def test_compiled_grammars_are_cached_by_content_in_a_bounded_lru(hf_tokenizer) -> None:
    compiler = GrammarCompiler.from_hf_tokenizer(hf_tokenizer, cache_size=2)
    a, b, c = (RegexConstraint(pattern=p) for p in ("a+", "b+", "c+"))
    compiler.matcher(a)
    compiler.matcher(RegexConstraint(pattern="a+"))  # equal content: a hit
    assert (compiler.cache_hits, compiler.cache_misses) == (1, 1)
    compiler.matcher(b)
    compiler.matcher(c)  # evicts a (least recently used)
    assert compiler.cache_len == 2
    compiler.matcher(a)
    assert (compiler.cache_hits, compiler.cache_misses) == (1, 4)
    # Copies from the cache are independent sequences.
    first, second = compiler.matcher(a), compiler.matcher(a)
    first.consume(hf_tokenizer.encode("aaa", add_special_tokens=False))
    assert second.num_consumed == 0 and not second.is_accepting()


def test_property_order_is_part_of_the_cache_key(compiler: GrammarCompiler, hf_tokenizer) -> None:
    ab = {
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    ba = {**ab, "properties": {"b": {"type": "integer"}, "a": {"type": "integer"}}}
    text = hf_tokenizer.encode('{"a":1,"b":2}', add_special_tokens=False)
    assert compiler.matcher(JsonSchemaConstraint(json_schema=ab)).validate_draft(text) == len(text)
    assert compiler.matcher(JsonSchemaConstraint(json_schema=ba)).validate_draft(text) < len(text)


def test_an_invalid_constraint_is_a_constraint_error(compiler: GrammarCompiler) -> None:
    with pytest.raises(ConstraintError, match="look-around"):
        compiler.matcher(RegexConstraint(pattern="(?=a)b"))
    with pytest.raises(ConstraintError, match="Unimplemented keys"):
        compiler.matcher(JsonSchemaConstraint(json_schema={"type": "object", "unevaluatedProperties": False}))
    # Not strict: the keyword the engine cannot enforce is ignored instead.
    compiler.matcher(JsonSchemaConstraint(json_schema={"type": "object", "unevaluatedProperties": False}, strict=False))


def test_logits_wider_than_the_tokenizer_are_never_allowed(hf_tokenizer) -> None:
    wide = GrammarCompiler.from_hf_tokenizer(hf_tokenizer, vocab_size=len(hf_tokenizer) + 64)
    matcher = wide.matcher(JsonObjectConstraint())
    for _ in range(5):
        allowed = allowed_ids(matcher, wide)
        assert allowed.max() < len(hf_tokenizer)
        matcher.consume([int(allowed[0])])


def test_mask_time_per_token(compiler: GrammarCompiler, record_property) -> None:
    """Measures the per-token mask cost on a realistic schema (recorded in the junit report as properties; the
    bound is loose against a busy box)."""
    matcher = compiler.matcher(JsonSchemaConstraint(json_schema=PERSON))
    row = allocate_bitmask(1, compiler.vocab_size)[0]
    rng = random.Random(3)
    times = []
    for _ in range(200):
        start = time.perf_counter()
        matcher.fill_bitmask(row)
        times.append(time.perf_counter() - start)
        allowed = np.flatnonzero(unpack_bitmask(row[None], compiler.vocab_size)[0])
        token = int(rng.choice(allowed))
        if token in (EOS, EXTRA_EOS):
            break
        matcher.consume([token])
    times.sort()
    median, p99 = times[len(times) // 2], times[min(len(times) - 1, int(len(times) * 0.99))]
    record_property("mask_median_us", round(median * 1e6))
    record_property("mask_p99_us", round(p99 * 1e6))
    assert median < 0.005


def test_a_schema_cannot_lift_the_whitespace_bound_or_strictness(compiler: GrammarCompiler, hf_tokenizer) -> None:
    schema = {
        "x-guidance": {
            "whitespace_flexible": True,
            "whitespace_pattern": r"\s*",
            "item_separator": r"\s*,",
            "lenient": True,
        },
        "type": "object",
        "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
        "required": ["a", "b"],
        "additionalProperties": False,
    }
    matcher = compiler.matcher(JsonSchemaConstraint(json_schema=schema))

    def allowed(text: str) -> bool:
        tokens = hf_tokenizer.encode(text, add_special_tokens=False)
        return matcher.validate_draft(tokens) == len(tokens)

    assert allowed('{"a": 1, "b": 2}') and allowed('{\n  "a": 1,\n  "b": 2\n}')
    assert not allowed('{"a":' + " " * 40 + "1")
    assert not allowed('{"a": 1   , "b": 2}')  # the separator stays ","
    with pytest.raises(ConstraintError, match="Unimplemented keys"):
        compiler.matcher(JsonSchemaConstraint(json_schema={**schema, "unevaluatedProperties": False}))


def test_bitmask_bits_are_tokens_least_significant_first() -> None:
    mask = np.zeros((2, 2), dtype=np.int32)
    mask[0, 1] = 1 << 3  # token 32 + 3
    mask[1, 0] = np.int32(-(2**31))  # the sign bit: token 31
    allowed = unpack_bitmask(mask, 40)
    assert allowed.shape == (2, 40)
    assert np.flatnonzero(allowed[0]).tolist() == [35] and np.flatnonzero(allowed[1]).tolist() == [31]
    assert allocate_bitmask(3, 40).shape == (3, 2) and unpack_bitmask(allocate_bitmask(1, 40), 40).all()


@pytest.mark.parametrize("vocab_size", [64, 49152, 49157])
def test_refused_tokens_is_the_complement_of_the_allowed_bits(vocab_size: int) -> None:
    rng = np.random.default_rng(vocab_size)
    bitmask = rng.integers(-(2**31), 2**31, size=(3, (vocab_size + 31) // 32), dtype=np.int64).astype(np.int32)
    refused = refused_tokens(bitmask, vocab_size)
    assert refused.shape == (3, vocab_size) and refused.dtype == np.uint8
    assert np.array_equal(refused.astype(bool), ~unpack_bitmask(bitmask, vocab_size))
    logits = torch.zeros(3, vocab_size)
    logits.masked_fill_(torch.from_numpy(refused).view(torch.bool), -float("inf"))  # as the sampler applies it
    assert torch.equal(torch.isinf(logits), torch.from_numpy(~unpack_bitmask(bitmask, vocab_size)))
