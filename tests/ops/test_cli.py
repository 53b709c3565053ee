"""The `inferq` command line: flags on top of env, dispatch to the lazily imported packages."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from common.settings import Settings
from ops.cli import build_parser, build_settings, main

REPO_ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key in [key for key in os.environ if key.startswith("INFERQ_")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("INFERQ_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("INFERQ_LOG_LEVEL", "warning")


def _fake_module(monkeypatch: pytest.MonkeyPatch, name: str, **attrs: Callable[..., Any]) -> None:
    parent, _, _ = name.rpartition(".")
    monkeypatch.setitem(sys.modules, parent, sys.modules.get(parent) or types.ModuleType(parent))
    module = types.ModuleType(name)
    for attr, value in attrs.items():
        setattr(module, attr, value)
    monkeypatch.setitem(sys.modules, name, module)


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    action = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_flags_override_env_and_unset_flags_keep_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("INFERQ_PORT", "9000")
    monkeypatch.setenv("INFERQ_MODEL", "from-env")
    monkeypatch.setenv("INFERQ_MAX_NUM_SEQS", "3")
    args = build_parser().parse_args(["serve", "--port", "8123", "--nats", "nats://h:4222", "--dtype", "float32"])
    settings = build_settings(args)
    assert (settings.port, settings.nats_url, settings.dtype) == (8123, "nats://h:4222", "float32")
    assert (settings.model, settings.max_num_seqs) == ("from-env", 3)


def test_every_flag_is_a_settings_field() -> None:
    for name, sub in _subcommands().items():
        for action in sub._actions:
            if action.option_strings and action.dest != "help":
                assert action.dest in Settings.model_fields, f"inferq {name} {action.option_strings}"


def test_worker_and_api_get_the_built_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, Settings] = {}

    def recorder(name: str) -> Callable[[Settings], None]:
        return lambda settings: seen.update({name: settings})

    _fake_module(monkeypatch, "engine_worker.main", run_worker=recorder("worker"))
    _fake_module(monkeypatch, "api.main", run_api=recorder("api"))
    assert main(["worker", "--model", "m1", "--nats", "nats://n:4222"]) == 0
    assert main(["api", "--host", "0.0.0.0", "--port", "8001", "--nats", "nats://n:4222"]) == 0
    assert (seen["worker"].model, seen["worker"].nats_url) == ("m1", "nats://n:4222")
    assert (seen["api"].host, seen["api"].port) == ("0.0.0.0", 8001)


def test_exit_code_of_the_handler_is_returned(monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_module(monkeypatch, "engine_worker.main", run_worker=lambda s: 3)
    assert main(["worker"]) == 3


def test_bench_gets_its_arguments_untouched(monkeypatch: pytest.MonkeyPatch) -> None:
    forwarded: list[list[str]] = []
    _fake_module(monkeypatch, "ops.bench", main=lambda argv: forwarded.append(argv) or 0)
    assert main(["bench", "--help", "--concurrency", "1,4", "--port", "9"]) == 0
    assert forwarded == [["--help", "--concurrency", "1,4", "--port", "9"]]


def test_invalid_settings_exit_2_with_a_message(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["worker", "--max-num-seqs", "0"])
    assert exit_info.value.code == 2
    assert "max_num_seqs" in capsys.readouterr().err


def test_no_command_prints_help_and_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == 2
    assert "serve" in capsys.readouterr().err


def test_version_goes_to_stdout(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["version"]) == 0
    assert capsys.readouterr().out.startswith("inferq ")


def test_python_m_ops_is_the_cli_and_imports_no_service_package() -> None:
    # `ops` launches api/broker/engine_worker but must not import them just to parse a command line.
    code = (
        "import sys, runpy; sys.argv = ['inferq', 'version']\n"
        "try:\n    runpy.run_module('ops', run_name='__main__')\n"
        "except SystemExit as e:\n    assert e.code == 0\n"
        "import ops.launcher, common.process\n"
        "banned = {'api', 'broker', 'engine_worker', 'torch'}\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in banned)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("inferq ")


@pytest.mark.parametrize("command", ["serve", "nats", "worker", "api", "agent", "bench", "users", "keys", "chaos"])
def test_every_command_help_renders(command: str, capsys: pytest.CaptureFixture[str]) -> None:
    # Help text comes from Settings descriptions; argparse %-formats it, so a stray "%" once crashed `serve --help`.
    # (bench hands its arguments to its own parser and returns the exit code instead of raising it.)
    try:
        code = main([command, "--help"])
    except SystemExit as exit_info:
        code = exit_info.code
    assert code == 0
    assert "--" in capsys.readouterr().out
