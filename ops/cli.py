"""The `inferq` command. Every subcommand builds `Settings` from `INFERQ_*` env, applies its flags on top,
configures logging and hands over to the package that does the work, imported only then: `ops` depends on
api/broker/engine_worker only to launch them."""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import structlog
from pydantic import ValidationError

from common.logging import configure_logging
from common.settings import Settings

Handler = Callable[[Settings], int | None]

# Flags map 1:1 onto Settings fields (dest = field name); help comes from the field's description.
# (flag, field, argparse kwargs)
_FlagDef = tuple[str, str, dict[str, Any]]
_COMMON: list[_FlagDef] = [
    ("--data-dir", "data_dir", {"type": Path, "metavar": "DIR", "help": "NATS store, model cache"}),
    ("--log-level", "log_level", {"choices": ["debug", "info", "warning", "error", "critical"]}),
    ("--log-format", "log_format", {"choices": ["auto", "json", "console"], "help": "auto: tty → console"}),
]
_CONNECT: list[_FlagDef] = [("--nats", "nats_url", {"metavar": "URL"})]
_LISTEN: list[_FlagDef] = [
    ("--nats", "nats_url", {"metavar": "URL", "help": "where to listen (default: loopback, random port)"}),
]
_EDGE: list[_FlagDef] = [
    ("--host", "host", {}),
    ("--port", "port", {"type": int}),
]
_ENGINE: list[_FlagDef] = [
    ("--model", "model", {"metavar": "NAME", "action": "append"}),  # serve: repeat for one worker per model
    ("--served-model-name", "served_model_name", {"metavar": "ID"}),
    ("--device", "device", {}),
    ("--dtype", "dtype", {"choices": ["auto", "float32", "bfloat16", "float16"]}),
    ("--max-num-seqs", "max_num_seqs", {"type": int}),
    ("--max-num-batched-tokens", "max_num_batched_tokens", {"type": int}),
    ("--max-model-len", "max_model_len", {"type": int}),
    ("--kv-cache-tokens", "kv_cache_tokens", {"type": int}),
    ("--torch-threads", "torch_threads", {"type": int}),
    ("--engine", "engine", {"choices": ["torch", "sim"]}),
    ("--sim-tokens-per-s", "sim_tokens_per_s", {"type": float}),
]
_AGENT: list[_FlagDef] = [
    ("--engine", "engine", {"choices": ["torch", "sim"], "help": "engine of the workers this agent starts"}),
    ("--deploy-nats-url", "deploy_nats_url", {"metavar": "URL"}),
    ("--deploy-remote-inferq", "deploy_remote_inferq", {"metavar": "PATH"}),
]


def _count_or_auto(value: str) -> int | str:
    return value if value == "auto" else int(value)


_SERVE: list[_FlagDef] = [
    ("--workers-per-model", "workers_per_model", {"type": _count_or_auto}),
]
_QUEUE: list[_FlagDef] = [
    ("--queue-max-requests", "queue_max_requests", {"type": int}),
]


# --- handlers: each imports its package only when run ---------------------------------------------------


def _serve(settings: Settings) -> int:
    from ops.launcher import run_serve

    return run_serve(settings)


def _nats(settings: Settings) -> int:
    from broker.embedded import run_foreground

    return run_foreground(settings)


def _worker(settings: Settings) -> int | None:
    from engine_worker.main import run_worker

    return run_worker(settings)


def _api(settings: Settings) -> int | None:
    from api.main import run_api

    return run_api(settings)


def _agent(settings: Settings) -> int | None:
    from ops.agent import run_agent

    return run_agent(settings)


def _bench(argv: list[str]) -> int | None:
    from ops.bench import main as bench_main

    return bench_main(argv)


def _chaos(argv: list[str]) -> int | None:
    from ops.chaos.cli import main as chaos_main

    return chaos_main(argv)


def _accounts(argv: list[str]) -> int | None:
    from api.auth.cli import main as accounts_main

    return accounts_main(argv)


# Subcommands with their own parsers: everything after the name is handed over untouched.
_FORWARDED: dict[str, Callable[[list[str]], int | None]] = {
    "bench": _bench,
    "chaos": _chaos,
    "users": lambda argv: _accounts(["users", *argv]),
    "keys": lambda argv: _accounts(["keys", *argv]),
}


def _version() -> int:
    try:
        version = importlib.metadata.version("inferq")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown (not installed)"
    sys.stdout.write(f"inferq {version}\n")
    return 0


# --- parser ---------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferq",
        description="Queue-backed LLM inference: HTTP edge, NATS JetStream, torch engine workers.",
        epilog="Every flag can also be set as INFERQ_<FIELD> in the environment; flags win.",
    )
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    _command(commands, "serve", _serve, "everything on this machine: embedded NATS, a worker and the api",
             _CONNECT, _COMMON, _EDGE, _ENGINE, _SERVE, _QUEUE)  # fmt: skip
    _command(commands, "nats", _nats, "an embedded nats-server in the foreground", _LISTEN, _COMMON)
    _command(commands, "worker", _worker, "an engine worker for one model, pulling from --nats",
             _CONNECT, _COMMON, _ENGINE, _QUEUE)  # fmt: skip
    _command(commands, "api", _api, "the HTTP edge (OpenAI / Aleph Alpha APIs), publishing to --nats",
             _CONNECT, _COMMON, _EDGE, _QUEUE)  # fmt: skip
    _command(commands, "agent", _agent, "a node agent: starts deployments' workers here or over SSH",
             _CONNECT, _COMMON, _AGENT)  # fmt: skip
    for name, help_text in (
        ("bench", "benchmark a running server (arguments go to the benchmark)"),
        ("users", "add, list or remove users (email/password login) in NATS"),
        ("keys", "create, list or revoke API keys in NATS"),
        ("chaos", "a seeded fault schedule against a local cluster (arguments go to it)"),
    ):
        forwarded = commands.add_parser(name, help=help_text, add_help=False)
        forwarded.add_argument("args", nargs=argparse.REMAINDER)
    commands.add_parser("version", help="print the installed version")
    return parser


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    handler: Handler,
    help_text: str,
    *groups: list[_FlagDef],
) -> None:
    sub = commands.add_parser(name, help=help_text, description=help_text)
    for group in groups:
        for flag, field, kwargs in group:
            # argparse formats help with %-interpolation: a description's own "%" must be escaped.
            kwargs = {"help": (Settings.model_fields[field].description or "").replace("%", "%%"), **kwargs}
            sub.add_argument(flag, dest=field, default=argparse.SUPPRESS, **kwargs)
    sub.set_defaults(handler=handler)


def build_settings(args: argparse.Namespace) -> Settings:
    """`INFERQ_*` env first, the flags given on the command line on top."""
    overrides = {key: value for key, value in vars(args).items() if key in Settings.model_fields}
    return Settings(**overrides)


# --- entry point ----------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    if args_list[:1] and args_list[0] in _FORWARDED:
        # Forward untouched (argparse would eat the subcommand's own --help and options).
        _configure_logging_from(parser, Settings)
        return _exit_code(_FORWARDED[args_list[0]](args_list[1:]))
    args = parser.parse_args(args_list)
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    if args.command == "version":
        return _version()
    settings = _configure_logging_from(parser, lambda: build_settings(args))
    structlog.contextvars.bind_contextvars(process=args.command)
    return _exit_code(args.handler(settings))


def _configure_logging_from(parser: argparse.ArgumentParser, make: Callable[[], Settings]) -> Settings:
    try:
        settings = make()
    except ValidationError as exc:
        parser.exit(2, f"inferq: invalid settings\n{exc}\n")
    configure_logging(settings.log_level, settings.log_format, secrets=settings.secret_values())
    return settings


def _exit_code(result: int | None) -> int:
    return 0 if result is None else int(result)


if __name__ == "__main__":
    sys.exit(main())
