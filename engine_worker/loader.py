"""Turn a model setting into a local HF directory: the packaged default, a local HF directory, a `.gguf` file
(dequantized once and cached as safetensors under the data dir), or a hub id."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from common.models import PACKAGED_MODELS, ModelNotFound, convert_gguf, packaged_model

__all__ = ["ModelNotFound", "ResolvedModel", "resolve_model"]


@dataclass(frozen=True, slots=True)
class ResolvedModel:
    served_name: str
    source: str
    local_dir: Path


def resolve_model(spec: str, cache_dir: Path, served_name: str | None = None) -> ResolvedModel:
    if spec in PACKAGED_MODELS:
        shipped = packaged_model(PACKAGED_MODELS[spec])
        local = convert_gguf(shipped, cache_dir) if shipped.suffix == ".gguf" else shipped
        return ResolvedModel(served_name or spec, str(shipped), local)
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
        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as exc:  # offline, unknown repo, gated: all mean "cannot serve this model here"
        raise ModelNotFound(f"cannot fetch {repo_id!r} from the hub: {exc}") from exc
