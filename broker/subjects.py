"""Subject, stream and bucket names in one place. Model ids (which contain `.`, `/`, spaces) are mapped to
subject-safe tokens without collisions."""

from __future__ import annotations

import hashlib
import re

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_MAX_TOKEN = 64

REQUEST_CONSUMER = "engine"
CANCEL_WILDCARD = "inf.cancel.*"
REGISTRY_BUCKET = "inferq_workers"
ARTIFACT_BUCKET = "inferq_artifacts"
ACCOUNTS_BUCKET = "inferq_accounts"
RATE_LIMIT_BUCKET = "inferq_ratelimits"


def model_token(model_id: str) -> str:
    """`Qwen/Qwen2.5-0.5B` -> `Qwen_Qwen2_5-0_5B_<hash>`: ids that were already safe map to themselves, any id
    that needed changing gets a digest suffix, so two different ids never share a token."""
    cleaned = _UNSAFE.sub("_", model_id)
    if cleaned == model_id and 0 < len(model_id) <= _MAX_TOKEN:
        return model_id
    digest = hashlib.sha256(model_id.encode()).hexdigest()[:10]
    return f"{cleaned[: _MAX_TOKEN - 11]}_{digest}"


def request_subject(model_id: str) -> str:
    return f"inf.req.{model_token(model_id)}"


def request_stream(model_id: str) -> str:
    return f"REQ_{model_token(model_id)}"


# Affinity (docs/routing.md): each worker also drains a subject of its own, captured by the same work-queue stream
# as the shared subject (one queue cap, one duplicate window), through a durable consumer of its own. The edge
# publishes a request there when the worker likely holds its prompt's cache; the shared subject stays as it was.
AFFINE_CONSUMER_PREFIX = "affine_"


def affine_subject(model_id: str, worker_id: str) -> str:
    return f"{request_subject(model_id)}.w.{worker_id}"


def affine_wildcard(model_id: str) -> str:
    return f"{request_subject(model_id)}.w.*"


def affine_consumer(worker_id: str) -> str:
    return f"{AFFINE_CONSUMER_PREFIX}{worker_id}"


def affine_worker(subject: str) -> str:
    """`inf.req.<model>.w.<worker_id>` → `<worker_id>`."""
    return subject.rsplit(".", 1)[1]


# Token events of interactive requests (inf.tok.<edge_id>.<request_id>) go out on core NATS and are also kept a
# few minutes by the JOURNAL stream, so another edge can replay them: a client whose edge died resumes its stream
# there (SSE Last-Event-ID), and a retried POST with the same Idempotency-Key attaches to its request. Batch
# lines, which nobody resumes that way, use inf.live.<edge_id>.<request_id>, which no stream captures.
JOURNAL_STREAM = "INFERQ_JOURNAL"
JOURNAL_WILDCARD = "inf.tok.>"


def token_subject(edge_id: str, request_id: str, *, journaled: bool = True) -> str:
    return f"inf.{'tok' if journaled else 'live'}.{edge_id}.{request_id}"


def token_wildcard(edge_id: str, *, journaled: bool = True) -> str:
    return f"inf.{'tok' if journaled else 'live'}.{edge_id}.*"


def is_journaled_reply(reply_subject: str) -> bool:
    return reply_subject.startswith("inf.tok.")


def journal_filter(request_id: str) -> str:
    """Every journaled event of one request, whichever edge's reply subject it went to."""
    return f"inf.tok.*.{request_id}"


# Fire-and-forget: a publisher names a reply subject under `inf.results.` instead of a live inbox. The RESULTS
# stream captures that namespace, so the events are stored (workers publish them through JetStream) and can be
# read later. Anything after the prefix is the publisher's: e.g. inf.results.<client>.<request_id>.
RESULTS_STREAM = "INFERQ_RESULTS"
RESULTS_PREFIX = "inf.results."
RESULTS_WILDCARD = "inf.results.>"


def results_subject(*tokens: str) -> str:
    return RESULTS_PREFIX + ".".join(tokens)


def is_durable_reply(reply_subject: str) -> bool:
    return reply_subject.startswith(RESULTS_PREFIX)


def last_delivery_subject(stream: str, seq: int) -> str:
    """Where a worker that takes a fire-and-forget request's last delivery stores a copy of it, so a max-deliveries
    watcher can answer it after its queue dropped the message (broker/max_deliveries.py). Inside the results
    namespace, which the worker role may publish to; `_inferq` is reserved there (no publisher's client name)."""
    return f"{RESULTS_PREFIX}_inferq.last_delivery.{stream}.{seq}"


# Requests whose workers died max_deliver times: JetStream never delivers such a message again and publishes a core
# NATS advisory naming its stream and sequence. A stream of ours keeps those advisories (a watcher that was down
# when one was published still sees it), and one durable consumer shared by every api replica works them off
# (broker/max_deliveries.py).
MAX_DELIVERIES_STREAM = "INFERQ_MAX_DELIVERIES"
MAX_DELIVERIES_WILDCARD = "$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.>"
MAX_DELIVERIES_CONSUMER = "max_deliveries"


def is_request_stream(stream: str) -> bool:
    """A model's work queue (request_stream, batch_stream)."""
    return stream.startswith(("REQ_", "BATCH_"))


def cancel_subject(request_id: str) -> str:
    return f"inf.cancel.{request_id}"


def registry_key(worker_id: str) -> str:
    return f"worker.{worker_id}"


def tokenizer_object(model_id: str, digest: str) -> str:
    return f"tokenizer.{model_token(model_id)}.{digest[:16]}.tar"


# --- accounts (hex ids only: KV keys cannot hold '@', and '..' fails misleadingly) ---------------------------

AUTH_MARKER_KEY = "meta.auth_enabled"


def api_key_key(key_id: str) -> str:
    return f"key.{key_id}"


def user_key(user_id: str) -> str:
    return f"user.{user_id}"


def login_token_key(user_id: str, token_id: str) -> str:
    return f"token.{user_id}.{token_id}"


def rate_limit_key(owner: str) -> str:
    """`key:3fa9…` → `rl.key_3fa9…`: owners are `<kind>:<hex>`."""
    return f"rl.{_UNSAFE.sub('_', owner)}"


# --- batch lane, files and batch jobs ---------------------------------------------------------------------------
# Batch lines go to a lane of their own (stream BATCH_<model>, subject inf.batch.<model>) that workers pull only
# when the interactive queue has nothing waiting; the job queue hands each batch to one runner.

BATCH_JOB_SUBJECT = "inf.jobs.batch"
BATCH_JOB_STREAM = "INFERQ_BATCH_JOBS"
BATCH_JOB_CONSUMER = "batch_runner"
FILES_BUCKET = "inferq_files"  # KV: file records
FILE_DATA_BUCKET = "inferq_file_data"  # object store: file contents, named by file id
BATCHES_BUCKET = "inferq_batches"  # KV: batch jobs, updated by compare-and-swap
BATCH_RESULTS_BUCKET = "inferq_batch_results"  # KV: one result per (batch, custom_id), create-only


def batch_subject(model_id: str) -> str:
    return f"inf.batch.{model_token(model_id)}"


def batch_stream(model_id: str) -> str:
    return f"BATCH_{model_token(model_id)}"


def file_key(file_id: str) -> str:
    return f"file.{file_id}"


def batch_key(batch_id: str) -> str:
    return f"batch.{batch_id}"


def batch_result_key(batch_id: str, custom_id: str) -> str:
    """custom_ids are arbitrary client strings: the key holds their digest."""
    return f"{batch_result_prefix(batch_id)}.{batch_result_digest(custom_id)}"


def batch_result_digest(custom_id: str) -> str:
    """The last token of a line's result key."""
    return hashlib.sha256(custom_id.encode()).hexdigest()[:32]


def batch_result_prefix(batch_id: str) -> str:
    return f"res.{batch_id}"


def batch_line_losses_key(batch_id: str, custom_id: str) -> str:
    """How often a line's workers stopped under it: beside its result, so purging the batch's results drops it."""
    return f"{batch_result_key(batch_id, custom_id)}.lost"


# --- Responses API ----------------------------------------------------------------------------------------------
# Stored responses (/v1/responses) in KV, one record per response; the events of background responses on a
# stream, one subject per response, so any replica replays and follows them.
RESPONSES_BUCKET = "inferq_responses"
RESPONSE_EVENTS_STREAM = "INFERQ_RESPONSE_EVENTS"
RESPONSE_EVENTS_WILDCARD = "inf.responses.events.>"
# Background responses to run: one ticket each, pulled by the runners of every api replica (like batch jobs).
RESPONSE_JOB_SUBJECT = "inf.jobs.responses"
RESPONSE_JOB_STREAM = "INFERQ_RESPONSE_JOBS"
RESPONSE_JOB_CONSUMER = "response_runner"


def response_key(response_id: str) -> str:
    return f"resp.{response_id}"


def response_events_subject(response_id: str) -> str:
    return f"inf.responses.events.{response_id}"


# --- deployments ------------------------------------------------------------------------------------------------
# Commands travel on core NATS (never stored: a deploy command may carry SSH secrets); start commands go to the
# agents' queue group so exactly one agent takes each. Log lines are kept per deployment in a JetStream stream.

DEPLOYMENTS_BUCKET = "inferq_deployments"  # KV: deployment records, updated by compare-and-swap
DEPLOY_START_SUBJECT = "inf.deploy.start"
AGENT_QUEUE_GROUP = "agents"
DEPLOY_LOG_STREAM = "INFERQ_DEPLOY_LOGS"
DEPLOY_LOG_WILDCARD = "inf.logs.>"


def deployment_key(deployment_id: str) -> str:
    return f"deployment.{deployment_id}"


def deploy_stop_subject(deployment_id: str) -> str:
    return f"inf.deploy.stop.{deployment_id}"


def deploy_stats_subject(deployment_id: str) -> str:
    return f"inf.deploy.stats.{deployment_id}"


def deploy_log_subject(deployment_id: str) -> str:
    return f"inf.logs.{deployment_id}"
