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


def token_subject(edge_id: str, request_id: str) -> str:
    return f"inf.tok.{edge_id}.{request_id}"


def token_wildcard(edge_id: str) -> str:
    return f"inf.tok.{edge_id}.*"


def cancel_subject(request_id: str) -> str:
    return f"inf.cancel.{request_id}"


def registry_key(worker_id: str) -> str:
    return f"worker.{worker_id}"


def tokenizer_object(model_id: str, digest: str) -> str:
    return f"tokenizer.{model_token(model_id)}.{digest[:16]}.tar"
