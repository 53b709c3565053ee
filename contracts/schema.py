"""The wire contract as JSON Schema, for direct NATS publishers in other languages. The document is versioned by
`SCHEMA_VERSION` (every message carries it as `v`); docs/nats-schema.json is this output, kept current by a test.

    python -c "from contracts.schema import write_json_schema; write_json_schema('schema.json')"
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter
from pydantic.json_schema import models_json_schema

from contracts.base import SCHEMA_VERSION
from contracts.errors import ErrorCode
from contracts.events import TokenEvent
from contracts.requests import CancelRequest, EmbedRequest, GenerateRequest, WorkRequest

_REF_TEMPLATE = "#/$defs/{model}"


def export_json_schema() -> dict[str, Any]:
    """One document: `$defs` holds every message; `WorkRequest` (what goes on a model's queue) and `TokenEvent`
    (what comes back on the reply subject) are the two discriminated unions a client needs."""
    _, document = models_json_schema(
        [(GenerateRequest, "validation"), (EmbedRequest, "validation"), (CancelRequest, "validation")],
        ref_template=_REF_TEMPLATE,
    )
    defs = dict(document.get("$defs", {}))
    for name, union in (("WorkRequest", WorkRequest), ("TokenEvent", TokenEvent)):
        schema = TypeAdapter(union).json_schema(ref_template=_REF_TEMPLATE)
        defs.update(schema.pop("$defs", {}))
        defs[name] = schema
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": f"urn:inferq:contracts:v{SCHEMA_VERSION}",
        "title": "inferq NATS wire contract",
        "description": "Messages on inf.req.<model> / inf.batch.<model> (WorkRequest), the reply subject "
        "(TokenEvent) and inf.cancel.<request_id> (CancelRequest). See docs/nats-protocol.md.",
        "version": SCHEMA_VERSION,
        "errorCodes": [code.value for code in ErrorCode],
        "$defs": dict(sorted(defs.items())),
    }


def json_schema_text() -> str:
    return json.dumps(export_json_schema(), indent=2, sort_keys=False) + "\n"


def write_json_schema(path: str | Path) -> Path:
    target = Path(path)
    target.write_text(json_schema_text())
    return target
