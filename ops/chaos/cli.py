"""`inferq chaos --minutes N --seed S`: one chaos run with its summary on stdout; exit 1 on any failure."""

from __future__ import annotations

import argparse
import asyncio
import random
import signal
import sys
import tempfile
from pathlib import Path

from ops.chaos.run import ChaosConfig, run_chaos


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferq chaos",
        description=(
            "Run a mixed workload against a 3-node NATS cluster, two api processes and two sim workers while a seeded "
            "schedule SIGKILLs or SIGSTOPs one of them every few seconds; check that nothing is lost or doubled."
        ),
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the fault schedule (default 10)")
    parser.add_argument("--seed", type=int, default=None, help="the schedule's seed (default: random, printed)")
    parser.add_argument(
        "--steady-s",
        type=float,
        default=60.0,
        help="seconds of workload without faults after the schedule, RSS sampled at both ends",
    )
    parser.add_argument(
        "--dir",
        type=Path,
        default=None,
        help="where processes keep their stores and logs (default: a new temporary directory)",
    )
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    seed = args.seed if args.seed is not None else random.randrange(2**31)
    root = args.dir or Path(tempfile.mkdtemp(prefix=f"inferq-chaos-{seed}-"))
    sys.stdout.write(f"chaos run: seed {seed}, {args.minutes:g} minutes of faults, logs in {root}\n")
    sys.stdout.flush()
    # SIGTERM unwinds like Ctrl-C, so the run stops the cluster and processes it started (the nats-server
    # nodes are not tied to this process's life: the chaos run restarts them from a worker thread).
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    report = asyncio.run(run_chaos(ChaosConfig(minutes=args.minutes, seed=seed, root=root, steady_s=args.steady_s)))
    sys.stdout.write(report.render() + "\n")
    return 0 if report.ok else 1
