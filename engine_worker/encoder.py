"""An embedding-only engine for encoder models (BERT / sentence-transformers directories such as
all-MiniLM-L6-v2): it answers `EmbedRequest`s and refuses generation. Every embed request that arrived since the
last loop turn runs as one padded batch."""

from __future__ import annotations

from pathlib import Path

import structlog
import torch

from contracts import EmbedRequest, GenerateRequest, Usage
from engine_worker.model_runner import resolve_device
from engine_worker.outputs import EmbedOutput, RequestOutput
from engine_worker.pooling import vectors_for
from engine_worker.validation import InvalidRequest, RequestLimits, resolve_layer

log = structlog.get_logger(__name__)


def is_encoder_model(model_dir: Path) -> bool:
    """True for checkpoints that cannot generate (no *ForCausalLM / *LMHeadModel architecture)."""
    from transformers import AutoConfig

    architectures = getattr(AutoConfig.from_pretrained(model_dir), "architectures", None) or []
    return not any(arch.endswith(("ForCausalLM", "LMHeadModel", "ForConditionalGeneration")) for arch in architectures)


class EncoderEngine:
    def __init__(self, model_dir: Path, *, device: str = "auto", torch_threads: int | None = None):
        from transformers import AutoModel

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = str(resolve_device(device))
        self.model = AutoModel.from_pretrained(model_dir, dtype=torch.float32).to(self.device).eval()
        config = self.model.config
        self.max_model_len: int = config.max_position_embeddings
        self.num_layers: int = config.num_hidden_layers
        self.vocab_size: int = config.vocab_size
        self.dtype_name = "float32"
        self.limits = RequestLimits(self.max_model_len, self.vocab_size, max_num_seqs=1, num_layers=self.num_layers)
        log.info("encoder loaded", path=str(model_dir), layers=self.num_layers, width=config.hidden_size)

    # --- the engine interface -----------------------------------------------------------------------------
    def validate(self, request: GenerateRequest | EmbedRequest) -> None:
        if isinstance(request, GenerateRequest):
            raise InvalidRequest(f"{request.model!r} is an embedding model; it cannot generate text")
        self.limits.check_embed(request)

    @torch.inference_mode()
    def embed(self, requests: list[EmbedRequest]) -> list[EmbedOutput]:
        inputs = [tokens for request in requests for tokens in request.inputs]
        width = max(len(tokens) for tokens in inputs)
        ids = torch.zeros(len(inputs), width, dtype=torch.long)
        mask = torch.zeros(len(inputs), width, dtype=torch.long)
        for row, tokens in enumerate(inputs):
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        states = self.model(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), output_hidden_states=True
        ).hidden_states  # layer 0 = embeddings
        outputs, row = [], 0
        for request in requests:
            layers = [resolve_layer(layer, self.num_layers) for layer in request.layers]
            vectors = []
            for index, tokens in enumerate(request.inputs):
                # Only the real tokens of the row: padding never enters a pooled vector.
                hidden = {layer: states[layer][row, : len(tokens)] for layer in layers}
                vectors.extend(vectors_for(request, index, hidden))
                row += 1
            usage = Usage(prompt_tokens=sum(len(tokens) for tokens in request.inputs))
            outputs.append(EmbedOutput(request.request_id, vectors, usage))
        return outputs

    def add_request(self, request: GenerateRequest) -> None:
        self.validate(request)

    def abort_request(self, request_id: str) -> None:
        pass  # embed batches run to completion within one loop turn

    def has_unfinished_requests(self) -> bool:
        return False

    def step(self) -> list[RequestOutput]:
        return []

    def stats(self) -> None:
        return None  # nothing runs between two embed batches
