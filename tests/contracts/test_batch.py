"""The batch lifecycle as a state machine, and the JSON Schema export for direct publishers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from contracts import SCHEMA_VERSION, BatchJob, BatchStatus
from contracts.batch import InvalidTransition, RequestCounts
from contracts.schema import export_json_schema, json_schema_text

DOCS = Path(__file__).resolve().parents[2] / "docs"


def job() -> BatchJob:
    return BatchJob(
        id="batch_1",
        owner="o",
        endpoint="/v1/completions",
        input_file_id="f",
        completion_window="24h",
        created_at=0,
        expires_at=86_400,
    )


def test_the_happy_path_sets_each_timestamp() -> None:
    done = (
        job()
        .transition(BatchStatus.IN_PROGRESS, 1)
        .transition(BatchStatus.FINALIZING, 2)
        .transition(BatchStatus.COMPLETED, 3)
    )
    assert (done.in_progress_at, done.finalizing_at, done.completed_at) == (1, 2, 3) and done.status.terminal


@pytest.mark.parametrize(
    "path",
    [
        [BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.COMPLETED, BatchStatus.CANCELLING],
        [BatchStatus.IN_PROGRESS, BatchStatus.FINALIZING, BatchStatus.CANCELLING],
        [BatchStatus.CANCELLING, BatchStatus.IN_PROGRESS],
        [BatchStatus.FAILED, BatchStatus.IN_PROGRESS],
    ],
)
def test_the_lifecycle_refuses_other_moves(path: list[BatchStatus]) -> None:
    current = job()
    with pytest.raises(InvalidTransition):
        for status in path:
            current = current.transition(status, 1)


def test_a_claim_bumps_the_epoch_and_progress_never_goes_back() -> None:
    assert job().claimed_by("r1").claimed_by("r2").epoch == 2
    shown = RequestCounts(total=5, completed=3, failed=1)
    assert shown.at_least(RequestCounts(completed=1)) == shown


def test_the_schema_names_every_message_and_is_versioned() -> None:
    schema = export_json_schema()
    assert schema["version"] == SCHEMA_VERSION and schema["$id"].endswith(f"v{SCHEMA_VERSION}")
    assert {"GenerateRequest", "EmbedRequest", "CancelRequest", "WorkRequest", "TokenEvent"} <= set(schema["$defs"])
    assert "queue_full" in schema["errorCodes"]
    json.dumps(schema)  # plain JSON


def test_the_published_schema_file_is_current() -> None:
    assert (DOCS / "nats-schema.json").read_text() == json_schema_text(), (
        'regenerate: python -c "from contracts.schema import write_json_schema; '
        "write_json_schema('docs/nats-schema.json')\""
    )
