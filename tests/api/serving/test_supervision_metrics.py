"""`inferq serve`'s restart counts on /metrics: rendered from the supervisor's status file, absent without it."""

from __future__ import annotations

from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from api.serving.metrics import render
from api.serving.supervision_metrics import read_supervisor_status
from contracts.supervision import ProcessState, SupervisedProcess, SupervisorStatus


def _samples(text: str) -> dict[tuple[str, str], float]:
    return {
        (sample.name, sample.labels.get("process", "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def test_restarts_and_states_are_rendered_per_process(tmp_path: Path) -> None:
    path = tmp_path / "supervisor.json"
    path.write_bytes(
        SupervisorStatus(
            updated_at=1.0,
            processes=[
                SupervisedProcess(name="nats-server", state=ProcessState.RUNNING, restarts=1),
                SupervisedProcess(name="worker", state=ProcessState.GAVE_UP, restarts=4, reason="crash loop"),
                SupervisedProcess(name="api", state=ProcessState.RESTARTING, restarts=2),
            ],
        ).to_bytes()
    )
    samples = _samples(render([], [], read_supervisor_status(path)).decode())
    assert samples[("inferq:process_restarts_total", "worker")] == 4
    assert samples[("inferq:process_restarts_total", "nats-server")] == 1
    assert [samples[("inferq:process_up", name)] for name in ("nats-server", "worker", "api")] == [1, 0, 0]
    assert samples[("inferq:process_given_up", "worker")] == 1
    assert samples[("inferq:process_given_up", "api")] == 0


def test_without_a_supervisor_there_is_no_process_family(tmp_path: Path) -> None:
    assert read_supervisor_status(None) is None
    assert read_supervisor_status(tmp_path / "missing.json") is None
    (tmp_path / "bad.json").write_text("{not json")
    assert read_supervisor_status(tmp_path / "bad.json") is None
    assert "process_restarts" not in render([], [], None).decode()
