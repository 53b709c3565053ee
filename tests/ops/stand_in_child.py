"""A stand-in for `inferq worker` / `inferq api` in launcher tests: notes its start and its SIGTERM in a
record file, dumps the INFERQ_* environment it got, and can die, ignore SIGTERM or leave a grandchild."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("name")
    parser.add_argument("record", type=Path)
    parser.add_argument("--die-after", type=float, help="exit on our own after this many seconds")
    parser.add_argument("--exit-code", type=int, default=3)
    parser.add_argument("--ignore-term", action="store_true", help="force the launcher to SIGKILL us")
    parser.add_argument("--grandchild", action="store_true", help="start a sleeper in our process group")
    args = parser.parse_args()

    def note(line: str) -> None:
        with args.record.open("a") as record:
            record.write(f"{line}\n")

    def on_term(*_: object) -> None:
        note(f"stop:{args.name}")
        sys.exit(0)

    signal.signal(signal.SIGTERM, signal.SIG_IGN if args.ignore_term else on_term)
    env = {key: value for key, value in os.environ.items() if key.startswith("INFERQ_")}
    args.record.with_name(f"{args.name}.env.json").write_text(json.dumps(env))
    if args.grandchild:
        sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
        note(f"grandchild:{args.name}:{sleeper.pid}")
    note(f"start:{args.name}")
    deadline = time.monotonic() + (args.die_after if args.die_after is not None else 120)
    while time.monotonic() < deadline:
        time.sleep(0.05)
    if args.die_after is not None:
        note(f"died:{args.name}")
        sys.exit(args.exit_code)


if __name__ == "__main__":
    main()
