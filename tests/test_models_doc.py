"""docs/models.md's supported-architectures table is the list the generic-path oracle tests run
(tests/model_fixtures.py TINY_ARCHITECTURES, parametrizing tests/engine_worker/test_generic_oracle.py)."""

from __future__ import annotations

from pathlib import Path

from tests.model_fixtures import TINY_ARCHITECTURES, architectures_table, render_models_doc

DOC = Path(__file__).resolve().parents[1] / "docs" / "models.md"


def test_the_doc_table_is_generated_from_the_tested_architectures() -> None:
    doc = DOC.read_text()
    assert render_models_doc(doc) == doc, "docs/models.md is stale: run `python -m tests.model_fixtures`"
    table = architectures_table()
    assert all(f"| `{name}` |" in table for name in TINY_ARCHITECTURES)
