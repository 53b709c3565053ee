"""`inferq serve` with stand-in children: the real Launcher (and a real embedded nats-server unless
INFERQ_NATS_URL is set) supervising `stand_in_child.py` processes. Importable for in-process tests, runnable
as `python -m tests.ops.stand_in_serve RECORD [--worker ARGS] [--api ARGS]` for tests that signal it."""

from __future__ import annotations

import argparse
import shlex
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path

from common.logging import configure_logging
from common.settings import Settings
from ops.launcher import BuildChildren, ChildSpec, Launcher, child_env

CHILD = Path(__file__).with_name("stand_in_child.py")


def recorded(record: Path) -> list[str]:
    return record.read_text().splitlines() if record.exists() else []


def has_started(record: Path, name: str) -> bool:
    return f"start:{name}" in recorded(record)


def stand_in_children(record: Path, *, worker: Sequence[str] = (), api: Sequence[str] = ()) -> BuildChildren:
    """A worker and an api like `build_children` makes; the api is ready once it has noted its start."""

    def build(settings: Settings) -> list[ChildSpec]:
        env = child_env(settings)

        def spec(name: str, extra: Sequence[str]) -> list[str]:
            return [sys.executable, str(CHILD), name, str(record), *extra]

        return [
            ChildSpec("worker", spec("worker", worker), env),
            ChildSpec("api", spec("api", api), env, ready_check=partial(has_started, record, "api"), essential=True),
        ]

    return build


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("record", type=Path)
    parser.add_argument("--worker", default="", help="extra stand_in_child arguments, shell-quoted")
    parser.add_argument("--api", default="")
    parser.add_argument("--stop-timeout", type=float, default=10.0)
    args = parser.parse_args()
    settings = Settings()
    configure_logging(settings.log_level, "json")
    build = stand_in_children(args.record, worker=shlex.split(args.worker), api=shlex.split(args.api))
    return Launcher(settings, build, stop_timeout_s=args.stop_timeout).run()


if __name__ == "__main__":
    sys.exit(main())
