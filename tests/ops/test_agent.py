"""The node agent's pure parts: which model ids it can serve here, how a worker's exit becomes a reason, the
worker command line, the deploy command's secret handling, the deployment lifecycle, and its place in
`inferq serve` and the CLI. The agent against real NATS, workers and sshd: tests/integration/test_deployments*.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from common.settings import Settings
from contracts.deployments import (
    DeployCommand,
    Deployment,
    DeploymentStatus,
    InvalidDeploymentTransition,
    SshConfig,
)
from ops.cli import build_parser, build_settings
from ops.deploy_launch import explain_exit, model_problem, shown, worker_arguments
from ops.launcher import build_children


def test_model_problem_accepts_what_a_worker_can_load_here(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "config.json").write_text("{}")
    assert model_problem(str(gguf)) is None
    assert model_problem(str(hf_dir)) is None
    assert model_problem("Qwen/Qwen2.5-0.5B") is None  # a hub id: the worker downloads it (or fails saying so)


def test_model_problem_names_what_is_wrong(tmp_path: Path) -> None:
    (tmp_path / "weights.bin").write_bytes(b"x")
    empty = tmp_path / "empty"
    empty.mkdir()
    assert model_problem(str(tmp_path / "missing.gguf")) == f"model path '{tmp_path / 'missing.gguf'}' does not exist"
    assert model_problem(str(tmp_path / "weights.bin")).endswith("is not a .gguf file")
    assert model_problem(str(empty)).endswith("has no config.json (and not exactly one .gguf file)")


def test_an_exit_is_explained_by_the_workers_last_words() -> None:
    traceback_tail = [
        "Traceback (most recent call last):",
        "  ...",
        "common.models.ModelNotFound: model path '/m' does not exist",
        "",
    ]
    assert explain_exit(1, traceback_tail) == (
        "the worker exited with code 1: common.models.ModelNotFound: model path '/m' does not exist"
    )
    json_tail = [json.dumps({"event": "worker.failed", "error": "CUDA out of memory", "level": "error"})]
    assert explain_exit(1, json_tail) == "the worker exited with code 1: worker.failed: CUDA out of memory"
    assert explain_exit(-9, []) == "the worker was killed"


def test_worker_arguments_name_the_model_and_the_nats_url() -> None:
    torch = worker_arguments(Settings(engine="torch"), "org/model", "nats://10.0.0.1:4222")
    assert torch == [
        "worker",
        "--model",
        "org/model",
        "--engine",
        "torch",
        "--nats",
        "nats://10.0.0.1:4222",
        "--log-format",
        "json",
    ]
    # The sim engine would call every model "sim": it serves the deployment's model id.
    sim = worker_arguments(Settings(engine="sim"), "m", "nats://h:1")
    assert sim[-2:] == ["--served-model-name", "m"]
    assert build_parser().parse_args(sim)  # the worker command accepts exactly these flags


def test_ssh_secrets_travel_in_the_command_but_never_show_in_its_repr() -> None:
    command = DeployCommand(
        deployment_id="d1", model_id="m", ssh=SshConfig(host="h", username="u", password="hunter2-secret")
    )
    assert "hunter2-secret" not in repr(command) and "hunter2-secret" not in str(command)
    received = DeployCommand.from_bytes(command.to_bytes())
    assert received.ssh is not None and received.ssh.password.get_secret_value() == "hunter2-secret"
    with pytest.raises(ValueError, match="exactly one of password or private_key"):
        SshConfig(host="h", username="u")
    with pytest.raises(ValueError, match="exactly one of password or private_key"):
        SshConfig(host="h", username="u", password="p", private_key="k")


def test_the_deployment_lifecycle() -> None:
    queued = Deployment(id="d", owner="anonymous", model_id="m", created_at=1.0, updated_at=1.0)
    active = queued.transition(DeploymentStatus.STARTING, 2.0).transition(DeploymentStatus.ACTIVE, 3.0)
    assert active.status is DeploymentStatus.ACTIVE and active.updated_at == 3.0
    stopped = active.transition(DeploymentStatus.STOPPED, 4.0)
    for later in DeploymentStatus:
        with pytest.raises(InvalidDeploymentTransition):
            stopped.transition(later, 5.0)  # final: a late agent cannot revive it
    with pytest.raises(InvalidDeploymentTransition):
        queued.transition(DeploymentStatus.ACTIVE, 2.0)  # never active without starting
    # An agent restarted after a crash starts the worker of a deployment it held again.
    assert active.transition(DeploymentStatus.STARTING, 5.0).status is DeploymentStatus.STARTING


def test_serve_runs_an_agent_unless_told_not_to() -> None:
    args = build_parser().parse_args(["serve", "--model", "SmolLM2-135M-Instruct"])
    names = [child.name for child in build_children(build_settings(args))]
    assert names == ["worker", "agent", "api"]
    agent = next(child for child in build_children(build_settings(args)) if child.name == "agent")
    assert agent.argv[-1] == "agent"
    without = build_children(build_settings(args).model_copy(update={"deploy_agent": False}))
    assert [child.name for child in without] == ["worker", "api"]


def test_the_agent_command_takes_its_flags() -> None:
    args = build_parser().parse_args(
        [
            "agent",
            "--nats",
            "nats://n:4222",
            "--engine",
            "sim",
            "--deploy-nats-url",
            "nats://public:4222",
            "--deploy-remote-inferq",
            "/opt/iq",
        ]
    )
    settings = build_settings(args)
    assert (settings.nats_url, settings.engine, settings.deploy_nats_url, settings.deploy_remote_inferq) == (
        "nats://n:4222",
        "sim",
        "nats://public:4222",
        "/opt/iq",
    )


def test_a_password_in_the_nats_url_is_masked_where_the_command_is_shown() -> None:
    argv = ["inferq", *worker_arguments(Settings(), "m", "nats://worker:s3cret@nats1:4222,nats://worker:s3cret@n2")]
    assert shown(argv).count("nats://worker:***@") == 2 and "s3cret" not in shown(argv)
