"""The engine's attention for the model's own transformers layers: one function registered in transformers'
`AttentionInterface`, reading and writing the engine's slot KV cache for the step's batch.

The generic runner (generic_runner.py) calls the model on the step's tokens as one flat sequence
`[1, N]` (prefill chunks and decodes of many sequences side by side, `position_ids` per token) and passes a
`StepAttention` through the forward's kwargs (transformers hands unknown kwargs down to the attention function),
so nothing global holds the batch. Per layer, the function writes the new keys/values at (slot, position), then
attends exactly like the fast path: one batched decode attention over whole slots (with any draft tokens as
extra queries) and one causal attention per prefill chunk. The architecture-specific arguments the modeling code
passes (`scaling`, `sliding_window`, `softcap`, `s_aux` sinks) are applied here; GQA/MQA and head dims come from
the tensors. Any other argument we do not understand raises `UnsupportedModelFeature`, which the runner's
load-time probe turns into a refusal naming the feature.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from engine_worker.model_runner import StepBatch

ATTENTION_NAME = "inferq"

# Arguments the modeling code may pass that do not change attention's result here (the flat batch carries no
# padding mask and no HF cache; positions are already applied by the model's rotary embedding).
_IGNORED_ARGUMENTS = frozenset(
    {
        "position_ids",
        "cache_position",
        "output_attentions",
        "use_cache",
        "past_key_values",
        "past_key_value",
        "return_dict",
        "output_hidden_states",
        "position_embeddings",
        "dropout",
        "layer_idx",
        "logits_to_keep",
    }
)


class UnsupportedModelFeature(ValueError):
    """The model's attention asks for something the engine's attention does not implement."""


def register_engine_attention() -> None:
    """Make `attn_implementation="inferq"` available (idempotent). The mask function returns None: the
    attention builds its own masks from the step's positions, so transformers need not build a 4D mask."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(ATTENTION_NAME, engine_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, _no_mask)


def _no_mask(*args: Any, **kwargs: Any) -> None:
    return None


def engine_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    sliding_window: int | None = None,
    softcap: float | None = None,
    s_aux: torch.Tensor | None = None,
    is_causal: bool | None = None,
    inferq_step: StepAttention | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """query [1, heads, N, head_dim], key/value [1, kv_heads, N, head_dim] -> ([1, N, heads, head_dim], None)."""
    if inferq_step is None:
        raise RuntimeError("the inferq attention runs only inside the engine's forward (no step was passed)")
    if is_causal is False:
        raise UnsupportedModelFeature("bidirectional (non-causal) attention")
    if getattr(module, "is_cross_attention", False):
        raise UnsupportedModelFeature("cross-attention")
    for name, arg in kwargs.items():
        if arg is not None and arg is not False and name not in _IGNORED_ARGUMENTS:
            raise UnsupportedModelFeature(f"attention argument {name!r}")
    if query.shape[0] != 1:
        raise RuntimeError("the engine's forward is one flat sequence of tokens (batch size 1)")
    spec = _HeadSpec(
        scale=scaling if scaling is not None else query.shape[-1] ** -0.5,
        window=sliding_window,
        softcap=softcap or None,
        sinks=s_aux,
    )
    q = query[0].transpose(0, 1)  # [N, heads, head_dim]
    k, v = key[0].transpose(0, 1), value[0].transpose(0, 1)  # [N, kv_heads, head_dim]
    out = inferq_step.attend(module.layer_idx, q, k, v, spec)
    return out.unsqueeze(0), None


@dataclass(frozen=True, slots=True)
class _HeadSpec:
    scale: float
    window: int | None  # a key is visible when query_pos - key_pos < window (transformers' convention)
    softcap: float | None  # scores -> tanh(scores / softcap) * softcap before masking
    sinks: torch.Tensor | None  # [heads]: one extra logit per head that takes probability mass but adds no value


def _scores_to_probs(scores: torch.Tensor, spec: _HeadSpec, head_dim_index: int) -> torch.Tensor:
    """Softmax over the last dim of masked fp32 scores, with the sink logit of each head taking part.
    `head_dim_index`: which dim of `scores` is the head (sinks broadcast along it)."""
    if spec.sinks is None:
        return torch.softmax(scores, dim=-1)
    shape = [1] * scores.dim()
    shape[head_dim_index] = -1
    sink = spec.sinks.float().view(shape).expand(*scores.shape[:-1], 1)
    return torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]


def causal_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, first_pos: int, spec: _HeadSpec
) -> torch.Tensor:
    """Queries q [L, heads, d] at positions first_pos.. against keys/values [kv_heads, total, d] holding
    positions 0..total-1 of the same sequence. Returns [L, heads, d]."""
    length, heads, _ = q.shape
    total = keys.shape[1]
    q_pos = torch.arange(first_pos, first_pos + length, device=q.device).unsqueeze(1)
    k_pos = torch.arange(total, device=q.device).unsqueeze(0)
    visible = k_pos <= q_pos
    if spec.window is not None:
        visible &= k_pos > q_pos - spec.window
    if spec.softcap is None and spec.sinks is None:
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0),
            keys.unsqueeze(0),
            values.unsqueeze(0),
            attn_mask=visible,
            scale=spec.scale,
            enable_gqa=True,
        )
        return out[0].transpose(0, 1)
    group = heads // keys.shape[0]
    keys, values = keys.repeat_interleave(group, dim=0), values.repeat_interleave(group, dim=0)
    scores = torch.matmul(q.transpose(0, 1), keys.transpose(1, 2)).float() * spec.scale  # [heads, L, total]
    if spec.softcap is not None:
        scores = torch.tanh(scores / spec.softcap) * spec.softcap
    scores = scores.masked_fill(~visible, -float("inf"))
    probs = _scores_to_probs(scores, spec, head_dim_index=0).to(values.dtype)
    return torch.matmul(probs, values).transpose(0, 1)


@dataclass
class StepAttention:
    """Attention for one engine step (or, with no cache, for one standalone sequence: embeddings and the
    load-time probe). `kv_shapes` records (kv_heads, head_dim) per layer as the layers run."""

    batch: StepBatch | None = None
    k_cache: list[torch.Tensor] = field(default_factory=list)  # per layer [slots, kv_heads, slot_len, head_dim]
    v_cache: list[torch.Tensor] = field(default_factory=list)
    kv_shapes: dict[int, tuple[int, int]] = field(default_factory=dict)
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)  # decode masks by sliding window

    def attend(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, spec: _HeadSpec) -> torch.Tensor:
        self.kv_shapes[layer] = (k.shape[1], k.shape[2])
        if self.batch is None:  # one sequence, nothing cached
            return causal_attention(q, k.transpose(0, 1), v.transpose(0, 1), 0, spec)
        batch, k_cache, v_cache = self.batch, self.k_cache[layer], self.v_cache[layer]
        k_cache[batch.token_slots, :, batch.positions] = k
        v_cache[batch.token_slots, :, batch.positions] = v
        out = torch.empty_like(q)
        if batch.decode_rows:
            out[batch.decode_index] = self._decode(q[batch.decode_index], k_cache, v_cache, spec)
        for start, length, slot, pos in batch.prefill_chunks:
            keys, values = k_cache[slot, :, : pos + length], v_cache[slot, :, : pos + length]
            out[start : start + length] = causal_attention(q[start : start + length], keys, values, pos, spec)
        return out

    def _decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, spec: _HeadSpec) -> torch.Tensor:
        """The decode rows (next tokens and their drafts) as one bmm over whole slots, as the fast path does.
        q: [D, heads, head_dim] -> same shape."""
        batch = self.batch
        assert batch is not None
        slots, queries = batch.decode_span, batch.decode_queries
        kv_heads, window, dim = k_cache.shape[1], k_cache.shape[2], k_cache.shape[3]
        heads = q.shape[1]
        group = heads // kv_heads
        q_full = q.new_zeros(slots, queries, heads, dim)
        q_full[batch.decode_slots, batch.decode_offsets] = q
        q_full = q_full.transpose(1, 2).reshape(slots * kv_heads, group * queries, dim)
        keys = k_cache[:slots].reshape(slots * kv_heads, window, dim)
        values = v_cache[:slots].reshape(slots * kv_heads, window, dim)
        scores = torch.bmm(q_full, keys.transpose(1, 2)).float().mul_(spec.scale)
        if spec.softcap is not None:
            scores = torch.tanh(scores / spec.softcap) * spec.softcap
        scores = scores.view(slots, kv_heads, group, queries, window) + self._decode_mask(spec.window, window)
        probs = _scores_to_probs(scores.view(slots, heads, queries, window), spec, head_dim_index=1)
        probs = probs.to(q.dtype).view(slots * kv_heads, group * queries, window)
        out = torch.bmm(probs, values).view(slots, heads, queries, dim)
        return out.transpose(1, 2)[batch.decode_slots, batch.decode_offsets]

    def _decode_mask(self, sliding: int | None, window: int) -> torch.Tensor:
        """Additive mask [slots, 1, 1, queries, window], built once per step and sliding window: the fast
        path's mask (each query sees its sequence so far), minus keys that fell out of the sliding window."""
        if sliding not in self._masks:
            batch = self.batch
            assert batch is not None
            mask = batch.decode_mask(window)
            if sliding is not None:
                lengths = [1] * batch.decode_span
                for slot, length in batch.decode_lengths:
                    lengths[slot] = length
                offsets = torch.arange(batch.decode_queries, device=batch.device)
                query_pos = torch.tensor(lengths, device=batch.device).unsqueeze(1) - 1 + offsets  # [slots, queries]
                too_old = torch.arange(window, device=batch.device) <= query_pos.unsqueeze(2) - sliding
                mask = mask.masked_fill(too_old.view_as(mask), -float("inf"))
            self._masks[sliding] = mask
        return self._masks[sliding]
