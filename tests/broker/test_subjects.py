from __future__ import annotations

import re

from broker import subjects

_TOKEN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def test_safe_ids_map_to_themselves() -> None:
    assert subjects.model_token("tiny-llama") == "tiny-llama"
    assert subjects.request_subject("tiny-llama") == "inf.req.tiny-llama"
    assert subjects.request_stream("tiny-llama") == "REQ_tiny-llama"


def test_unsafe_ids_become_distinct_valid_tokens() -> None:
    ids = ["Qwen/Qwen2.5-0.5B", "Qwen_Qwen2_5-0_5B", "Qwen/Qwen2.5 0.5B", "a.b", "a_b", "a*b", "x" * 200, "x" * 201]
    tokens = [subjects.model_token(model_id) for model_id in ids]
    assert len(set(tokens)) == len(ids)
    assert all(_TOKEN.match(token) for token in tokens)


def test_token_subjects_nest_under_the_edge_wildcard() -> None:
    assert subjects.token_subject("e1", "r9") == "inf.tok.e1.r9"
    assert subjects.token_wildcard("e1") == "inf.tok.e1.*"
    assert subjects.cancel_subject("r9").startswith(subjects.CANCEL_WILDCARD[:-1])
