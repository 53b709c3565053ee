"""Files a worker publishes so an edge on another machine can tokenize without the model: the tokenizer files
travel as one tar in the object store, named by content digest so edges cache them safely."""

from __future__ import annotations

import contextlib
import hashlib
import io
import shutil
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path

from nats.js import JetStreamContext
from nats.js import errors as jse

from broker import subjects
from broker.topology import ensure_artifacts, retrying_while_electing

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "generation_config.json",
    "config.json",
)


def _tokenizer_archive(model_dir: Path) -> tuple[bytes, str]:
    files = sorted(name for name in TOKENIZER_FILES if (model_dir / name).is_file())
    digest = hashlib.sha256()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in files:
            data = (model_dir / name).read_bytes()
            digest.update(name.encode() + b"\0" + data)
            info = tarfile.TarInfo(name)
            info.size = len(data)  # mtime stays 0: the same files give the same archive
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue(), digest.hexdigest()


@retrying_while_electing  # idempotent: a worker's startup should not die of one slow answer on a busy box
async def publish_tokenizer(js: JetStreamContext, model_id: str, model_dir: Path, replicas: int = 1) -> str:
    """Upload the tokenizer of `model_dir` once per content; returns the object name."""
    data, digest = _tokenizer_archive(model_dir)
    name = subjects.tokenizer_object(model_id, digest)
    store = await ensure_artifacts(js, replicas)
    try:
        await store.get_info(name)
    except jse.ObjectNotFoundError:
        await store.put(name, data)
    return name


async def fetch_tokenizer(js: JetStreamContext, name: str, cache_dir: Path) -> Path:
    """Download and unpack a published tokenizer into `cache_dir/name/` (skipped when already there)."""
    target = cache_dir / name.removesuffix(".tar")
    if target.is_dir():
        return target
    store = await ensure_artifacts(js)
    buffer = io.BytesIO()
    await store.get(name, writeinto=buffer)  # writeinto: get() into memory is quadratic in nats-py
    buffer.seek(0)
    with directory_in_place(target) as staging, tarfile.open(fileobj=buffer, mode="r") as tar:
        tar.extractall(staging, filter="data")
    return target


@contextlib.contextmanager
def directory_in_place(target: Path) -> Iterator[Path]:
    """Fill a staging directory, then move it to `target` in one rename: processes sharing a data dir (several
    workers, several api replicas) never see a half-written directory. If another process got there first, its
    directory stays and this one is dropped (both hold the same files)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging
        try:
            staging.rename(target)
        except OSError:
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
