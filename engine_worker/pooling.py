"""Turning hidden states into embedding vectors: the pooling modes of the embed surfaces (mean, max, last_token,
abs_max, none = one vector per token), optionally L2-normalised. Shared by every engine that answers
`EmbedRequest`s; layer numbers are resolved (and checked) in validation.py."""

from __future__ import annotations

import torch

from contracts import EmbeddingVector, EmbedRequest, Pooling


def pool(hidden: torch.Tensor, pooling: Pooling) -> torch.Tensor:
    """hidden: [tokens, width] → [width] (or [tokens, width] for Pooling.NONE)."""
    if pooling == Pooling.MEAN:
        return hidden.mean(dim=0)
    if pooling == Pooling.MAX:
        return hidden.max(dim=0).values
    if pooling == Pooling.LAST_TOKEN:
        return hidden[-1]
    if pooling == Pooling.ABS_MAX:
        # The signed value of the largest magnitude per dimension.
        index = hidden.abs().argmax(dim=0, keepdim=True)
        return hidden.gather(0, index)[0]
    return hidden


def vectors_for(request: EmbedRequest, input_index: int, layers: dict[int, torch.Tensor]) -> list[EmbeddingVector]:
    """Every (layer, pooling) the request asked for, from `layers`: absolute layer → [tokens, width] states."""
    vectors = []
    for layer, hidden in layers.items():
        for pooling in request.pooling:
            pooled = pool(hidden.float(), pooling)
            if request.normalize:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            vectors.append(
                EmbeddingVector(input_index=input_index, layer=layer, pooling=pooling.value, values=pooled.tolist())
            )
    return vectors
