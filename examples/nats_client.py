"""A direct NATS client: no HTTP, no api process. It tokenizes a chat message with the tokenizer the model's
worker published, publishes a GenerateRequest straight to the model's JetStream queue, prints the token stream
from its reply subject, and cancels the generation on Ctrl-C. The protocol is in docs/nats-protocol.md.

    python examples/nats_client.py --nats nats://127.0.0.1:4222 --model SmolLM2-135M-Instruct "Tell me a joke"

Fire-and-forget: `--detach` names a durable results subject instead of a live inbox, prints it and exits; the
answer is stored in JetStream (it survives a worker crash: the request is redone elsewhere) and read later:

    subject=$(python examples/nats_client.py --model SmolLM2-135M-Instruct --detach "Tell me a joke")
    python examples/nats_client.py --fetch "$subject" --wait 60

Exit codes: 0 done, 2 the queue is full (retry later), 3 the request failed, 4 (--fetch) not finished yet,
130 cancelled with Ctrl-C.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

import nats
from nats.js import errors as jse

from broker import subjects
from broker.artifacts import fetch_tokenizer
from broker.registry import WorkerRegistry
from broker.results import read_result
from contracts import CancelRequest, GenerateRequest, SamplingParams, parse_event
from contracts.constraints import parse_constraint

QUEUE_FULL = 10077  # JetStream err_code when the model's queue is at its cap


async def chat_token_ids(js, model: str, text: str) -> list[int]:
    """The model's chat template applied to one user message, with the tokenizer its worker published."""
    from transformers import AutoTokenizer

    workers = [
        worker
        for worker in await WorkerRegistry(await js.key_value(subjects.REGISTRY_BUCKET)).live_workers()
        if worker.model == model
    ]
    if not workers:
        raise SystemExit(f"no live worker serves {model!r}")
    directory = await fetch_tokenizer(js, workers[0].tokenizer_object, Path(tempfile.gettempdir()) / "inferq-tok")
    tokenizer = AutoTokenizer.from_pretrained(directory)
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True
    )
    return tokenizer.encode(rendered, add_special_tokens=False)


async def run(args: argparse.Namespace) -> int:
    nc = await nats.connect(
        args.nats, name="inferq-example-client", user=args.user, password=args.password, inbox_prefix=args.inbox_prefix
    )
    try:
        if args.fetch:
            return await fetch(nc.jetstream(), args.fetch, args.wait)
        if args.detach:
            return await detach(nc.jetstream(), args)
        return await stream(nc, args)
    finally:
        await nc.drain()


def build_request(
    args: argparse.Namespace, request_id: str, prompt_token_ids: list[int], reply_subject: str, deadline: float | None
) -> GenerateRequest:
    sampling = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, ignore_eos=args.ignore_eos)
    return GenerateRequest(
        request_id=request_id,
        model=args.model,
        prompt_token_ids=prompt_token_ids,
        sampling=sampling,
        reply_subject=reply_subject,
        deadline=deadline,
        constraint=args.constraint,
    )


async def submit(js, request: GenerateRequest) -> bool:
    """Queue the request; False (after saying so) when the model's queue is full."""
    try:
        await js.publish(
            subjects.request_subject(request.model),
            request.to_bytes(),
            timeout=2,
            headers={"Nats-Msg-Id": request.request_id},
        )  # a retried publish is queued once
    except jse.ServiceUnavailableError as exc:
        if exc.err_code == QUEUE_FULL:
            sys.stderr.write("the model's queue is full; retry later\n")
            return False
        raise
    sys.stderr.write(f"request {request.request_id} queued\n")
    return True


async def detach(js, args: argparse.Namespace) -> int:
    """Queue the request with a durable results subject and print that subject; nothing waits for the answer."""
    request_id = f"ex{uuid.uuid4().hex}"
    reply_subject = subjects.results_subject(args.client_id, request_id)
    prompt = await chat_token_ids(js, args.model, args.message)
    if not await submit(js, build_request(args, request_id, prompt, reply_subject, deadline=None)):
        return 2
    sys.stdout.write(reply_subject + "\n")
    return 0


async def fetch(js, reply_subject: str, wait_s: float) -> int:
    """Print a detached request's stored answer (waiting up to `wait_s` for it to finish)."""
    result = await read_result(js, reply_subject, wait_s=wait_s)
    for event in result.events:
        if event.kind == "tokens":
            sys.stdout.write("".join(choice.text for choice in event.choices if choice.index == 0))
    if not result.finished:
        sys.stderr.write("\nnot finished yet\n")
        return 4
    return report_end(result.events[-1])


async def stream(nc, args: argparse.Namespace) -> int:
    js = nc.jetstream()
    client_id = args.client_id
    request_id = f"ex{uuid.uuid4().hex}"
    events: asyncio.Queue = asyncio.Queue()

    async def on_event(msg) -> None:
        events.put_nowait(msg.data)

    # Subscribe before publishing: events sent before a subscription exists are dropped by core NATS.
    await nc.subscribe(subjects.token_wildcard(client_id), cb=on_event)
    await nc.flush()
    prompt = await chat_token_ids(js, args.model, args.message)
    request = build_request(
        args, request_id, prompt, subjects.token_subject(client_id, request_id), deadline=time.time() + 60
    )
    try:
        if not await submit(js, request):
            return 2
        return await print_stream(events)
    except asyncio.CancelledError:  # Ctrl-C: stop the generation on the worker, not just our reading
        # (also when it lands during the publish: the worker keeps the cancel of a request it has not pulled yet)
        await nc.publish(
            subjects.cancel_subject(request_id), CancelRequest(request_id=request_id, reason="ctrl-c").to_bytes()
        )
        await nc.flush()
        sys.stderr.write(f"\nrequest {request_id} cancelled\n")
        return 130


async def print_stream(events: asyncio.Queue) -> int:
    while True:
        # Not asyncio.wait_for: on Python 3.11 a Ctrl-C (a cancel of this task) that lands once the next event is
        # already taken but before wait_for returns is swallowed, and the whole answer streams on (exit 0). That
        # window is wide when events pile up on a busy machine.
        async with asyncio.timeout(30):  # workers heartbeat every second
            data = await events.get()
        event = parse_event(data)
        if event.kind == "tokens":
            sys.stdout.write("".join(choice.text for choice in event.choices if choice.index == 0))
            sys.stdout.flush()
        elif event.kind in ("end", "error"):
            return report_end(event)


def report_end(event) -> int:
    if event.kind == "error":
        sys.stderr.write(f"\nfailed: {event.error.code.value}: {event.error.message}\n")
        return 3
    sys.stdout.write("\n")
    sys.stderr.write(f"usage: {event.usage.prompt_tokens} prompt + {event.usage.completion_tokens} completion tokens\n")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("message", nargs="?")
    parser.add_argument("--nats", default="nats://127.0.0.1:4222")
    parser.add_argument("--user", default=os.environ.get("NATS_USER"), help="default: $NATS_USER")
    parser.add_argument("--password", default=os.environ.get("NATS_PASSWORD"), help="default: $NATS_PASSWORD")
    parser.add_argument(
        "--inbox-prefix",
        default="_INBOX",
        help="reply inboxes; a server with per-user permissions names one (ops/nats/auth.conf)",
    )
    parser.add_argument(
        "--client-id",
        default=f"c{uuid.uuid4().hex[:12]}",
        help="the reply-subject segment: inf.tok.<client-id>.* or inf.results.<client-id>.*",
    )
    parser.add_argument("--model")
    parser.add_argument("--detach", action="store_true", help="fire-and-forget: print the results subject, exit")
    parser.add_argument("--fetch", metavar="SUBJECT", help="print the stored answer of a detached request")
    parser.add_argument("--wait", type=float, default=0.0, help="with --fetch: seconds to wait for it to finish")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--ignore-eos", action="store_true")
    parser.add_argument(
        "--constraint",
        type=parse_constraint,
        metavar="JSON",
        help='structured output, e.g. \'{"type": "regex", "pattern": "[0-9]{3}"}\' (see the schema)',
    )
    args = parser.parse_args()
    if not args.fetch and not (args.model and args.message):
        parser.error("a message and --model are needed (or --fetch SUBJECT)")
    try:
        return asyncio.run(run(args))
    except KeyboardInterrupt:  # only reached if Ctrl-C lands outside the stream (asyncio.run handles it inside)
        return 130


if __name__ == "__main__":
    sys.exit(main())
