"""The model on its device: weights, the KV cache, and one batched forward per engine step.

For llama-layout architectures (`SUPPORTED_ARCHITECTURES`: RMSNorm, rotary, GQA, SiLU-gated MLP, optional
q/k/v biases) the forward is written directly over the HF weights, gpt-fast style: every token scheduled in a
step (decodes and prefill chunks of any number of sequences) goes through the projections and the MLP as one
flat `[tokens, hidden]` batch; only attention is split, into one batched decode attention over the slot cache
and one causal attention per prefill chunk. Logits are computed only for the rows that are sampled (or whose
prompt logprobs were asked for). Other architectures run on the generic path (generic_runner.py), which
runner_factory.py chooses; the KV cache view and the step's index tensors (`SlotKVCache`, `StepBatch`) are
shared with it.

The cache per layer is one buffer of `kv_capacity` tokens, viewed as `[slots, kv_heads, slot_len, head_dim]`
(see kv_cache.py); decode attention reads whole slots `[:highest_slot+1]`, the slot length tracking the longest
running sequence.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import structlog
import torch
import torch.nn.functional as F

from contracts import EmbeddingVector, EmbedRequest
from engine_worker.compiled_decode import CompiledDecode, CompileState, resolve_compile_decode
from engine_worker.kv_cache import Relayout, round_up
from engine_worker.kv_memory import KVBuffers, release_freed_memory, trim_heap
from engine_worker.linear import Linear, WeightQuantPlan, fused_linear, lookup_table, owned
from engine_worker.pooling import vectors_for
from engine_worker.prefix_store import PrefixStore
from engine_worker.sampler import Sampler, SamplerOutput, compute_prompt_logprobs
from engine_worker.sampling_rows import SamplingRow, TokenLogprobData
from engine_worker.sequence import Sequence
from engine_worker.step_threads import StepThreadRule, StepThreads
from engine_worker.validation import resolve_layer
from engine_worker.weight_quant import resolve_weight_quant

log = structlog.get_logger(__name__)

SUPPORTED_ARCHITECTURES = frozenset({"LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM"})
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _cpu_has_bf16() -> bool:
    """Native bf16 (avx512_bf16 / AMX) makes bf16 ~2x faster than fp32; emulated bf16 is slower."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return platform.machine() == "arm64"  # Apple silicon has bf16 instructions
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """auto: bf16 on CUDA (fp16 on pre-Ampere), bf16 on a CPU with native bf16, else fp32."""
    if name != "auto":
        return _DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if device.type == "cpu" and _cpu_has_bf16() else torch.float32


@dataclass
class _Layer:
    ln1: torch.Tensor
    qkv: Linear
    o: Linear
    ln2: torch.Tensor
    gate_up: Linear
    down: Linear


@dataclass
class RunOutput:
    sampled: SamplerOutput  # one entry per sampled sequence, in `sample_seqs` order
    prompt_logprobs: dict[Sequence, list[TokenLogprobData]]


class SlotKVCache:
    """The pre-allocated per-layer KV buffers and their slot view (kv_cache.py), shared by both model paths.
    Subclasses set `num_layers`, `num_kv_heads`, `head_dim`, `dtype` and `device` before allocating."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    max_model_len: int

    def _start_loading(self, model_dir: str | Path, device: str, dtype: str, torch_threads: int | None) -> Any:
        """Threads, device, dtype, the sampler and an empty cache; returns the model's transformers config."""
        from transformers import AutoConfig

        if torch_threads:
            torch.set_num_threads(torch_threads)
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.sampler = Sampler(self.device)
        self.k_cache: list[torch.Tensor] = []
        self.v_cache: list[torch.Tensor] = []
        self.slot_len = 0
        return AutoConfig.from_pretrained(model_dir)

    def _log_loaded(self, model_dir: str | Path, **details: Any) -> None:
        log.info(
            "model loaded",
            path=str(model_dir),
            device=str(self.device),
            dtype=str(self.dtype),
            layers=self.num_layers,
            max_model_len=self.max_model_len,
            threads=torch.get_num_threads(),
            **details,
        )

    @property
    def device_name(self) -> str:
        return str(self.device)

    @property
    def dtype_name(self) -> str:
        return str(self.dtype).removeprefix("torch.")

    def compiled_decode_state(self) -> CompileState | None:
        """None: this runner has no compiled step (ModelRunner's may)."""
        return None

    def pooled_vectors(self, request: EmbedRequest) -> list[EmbeddingVector]:
        """Pooled hidden states of each input of `request`, computed outside the KV cache by the
        subclass's `hidden_states`."""
        layers = list(dict.fromkeys(resolve_layer(layer, self.num_layers) for layer in request.layers))
        vectors = []
        for index, tokens in enumerate(request.inputs):
            states = self.hidden_states(tokens, set(layers))
            vectors += vectors_for(request, index, {layer: states[layer] for layer in layers})
        return vectors

    # --- KV cache -------------------------------------------------------------------------------------------
    @property
    def kv_bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * torch.finfo(self.dtype).bits // 8

    def allocate_kv_cache(self, capacity: int, slot_len: int) -> None:
        """Once, at start-up. Zeroed so masked-out positions never hold NaN (0 * NaN would leak through); on a
        CPU committed page by page as sequences first write it (kv_memory.py)."""
        self.k_cache = self.v_cache = []  # drop a previous cache before mapping the new one
        kv = self._kv_buffers_for(capacity)
        self.k_cache, self.v_cache = kv.buffers[: self.num_layers], kv.buffers[self.num_layers :]
        self._kv_buffers = kv
        self.capacity = capacity
        self.slot_len = slot_len

    def _kv_buffers_for(self, capacity: int) -> KVBuffers:
        """Every layer's flat K buffer, then every layer's V buffer, each of `capacity` tokens."""
        return KVBuffers(2 * self.num_layers, capacity * self.num_kv_heads * self.head_dim, self.dtype, self.device)

    def release_kv_memory(self) -> None:
        """Give the cache's pages back (CPU), and the heap pages the steps' activations left free in malloc's
        arenas; the caller guarantees no sequence holds KV."""
        self._kv_buffers.release()
        trim_heap()

    def _view(self, flat: torch.Tensor, slot_len: int) -> torch.Tensor:
        slots = self.capacity // slot_len
        return flat[: slots * self.num_kv_heads * slot_len * self.head_dim].view(
            slots, self.num_kv_heads, slot_len, self.head_dim
        )

    @torch.inference_mode()
    def relayout(self, plan: Relayout) -> None:
        """Re-view the cache with a new slot length, moving running sequences into compacted slots."""
        old_slots = [old for old, _ in plan.moves]
        new_slots = [new for _, new in plan.moves]
        for flat in (*self.k_cache, *self.v_cache) if plan.moves else ():
            # Old and new views overlap in memory: take the data out before writing it back.
            saved = self._view(flat, plan.old_slot_len)[old_slots, :, : plan.copy_len].clone()
            self._view(flat, plan.slot_len)[new_slots, :, : plan.copy_len] = saved
        self.slot_len = plan.slot_len

    def allocate_prefix_store(self, num_blocks: int, block_size: int) -> None:
        """Buffers for cached prefix blocks (prefix_store.py), beside the slot cache."""
        self.prefix_store = PrefixStore(
            2 * self.num_layers, num_blocks, block_size, self.num_kv_heads, self.head_dim, self.dtype, self.device
        )

    def save_prefix(self, slot: int, copies: list[tuple[int, int]]) -> None:
        self.prefix_store.save(self._slot_views(), slot, copies)

    def release_prefix_blocks(self, block_ids: list[int]) -> None:
        self.prefix_store.release(block_ids)

    def load_prefixes(self, loads: list[tuple[int, list[int]]]) -> None:
        self.prefix_store.load(self._slot_views(), loads)

    def _slot_views(self) -> list[torch.Tensor]:
        return [self._view(flat, self.slot_len) for flat in (*self.k_cache, *self.v_cache)]

    @torch.inference_mode()
    def copy_prefixes(self, copies: list[tuple[int, int, int]]) -> None:
        """Copy the first `n` tokens of KV from slot to slot (choices of one request share the prompt)."""
        for flat in (*self.k_cache, *self.v_cache):
            view = self._view(flat, self.slot_len)
            for src, dst, n in copies:
                view[dst, :, :n] = view[src, :, :n]


def check_rope_scaling(config: object) -> None:
    """Dynamic NTK frequencies depend on the longest position of the forward, which a mixed batch breaks."""
    rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    if rope.get("rope_type", rope.get("type")) == "dynamic":
        raise ValueError("dynamic NTK rope scaling is not supported (its frequencies depend on the length)")


class ModelRunner(SlotKVCache):
    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str,
        dtype: str,
        max_model_len: int | None,
        torch_threads: int | None,
        weight_quant: str = "none",
        weight_quant_max_rows: int = 0,
        small_step_threads: int | None = None,
        small_step_rows: int = 0,
        compile_decode: bool | Literal["auto"] = False,
    ) -> None:
        from transformers import AutoModelForCausalLM

        config = self._start_loading(model_dir, device, dtype, torch_threads)
        base_threads = torch.get_num_threads()
        self.step_threads = StepThreads(
            StepThreadRule(base_threads, small_step_threads or base_threads, small_step_rows), torch.set_num_threads
        )
        archs = set(getattr(config, "architectures", None) or [])
        if not archs & SUPPORTED_ARCHITECTURES:
            raise ValueError(
                f"the fast path does not run {sorted(archs) or config.model_type!r}: it runs llama-layout models "
                f"({', '.join(sorted(SUPPORTED_ARCHITECTURES))}); model_impl auto or generic runs others"
            )
        check_rope_scaling(config)
        self.max_model_len = min(max_model_len or config.max_position_embeddings, config.max_position_embeddings)
        sliding = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        if sliding and self.max_model_len > sliding:
            log.warning("capping max_model_len at the sliding window", sliding_window=sliding)
            self.max_model_len = sliding
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype).to(self.device).eval()
        weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters() if p.dim() == 2)
        capability = torch.backends.cpu.get_cpu_capability()
        mode = resolve_weight_quant(weight_quant, weight_bytes, self.dtype, self.device, capability)
        quant = WeightQuantPlan(mode, weight_quant_max_rows)
        self._load_weights(model, config, quant)
        del model  # the runner keeps its own copies of the weights: the HF module and the file mapping can go
        release_freed_memory()
        compiles = resolve_compile_decode(compile_decode, self.device)
        self.compiled_decode: CompiledDecode | None = CompiledDecode(self) if compiles else None
        self._log_loaded(
            model_dir,
            model_impl="fast",
            weight_quant=self.lm_head.quant and self.lm_head.quant.name,
            weight_quant_rows=self.lm_head.quant and (self.lm_head.quant.max_rows or "all"),
            dense_weights=self.lm_head.keeps_dense,
            compile_decode=compiles,
        )

    @torch.inference_mode()
    def _load_weights(self, model: torch.nn.Module, config: object, quant: WeightQuantPlan) -> None:
        self.vocab_size = model.config.vocab_size
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.eps = config.rms_norm_eps
        self.scale = self.head_dim**-0.5
        inner = model.model
        self.norm = owned(inner.norm.weight)
        self.lm_head = Linear(model.lm_head.weight, None, quant.for_lm_head())  # the embedding's when tied
        self.embed = lookup_table(inner.embed_tokens.weight, half=not self.lm_head.keeps_dense)
        self.layers = []
        for layer in inner.layers:
            attn, mlp = layer.self_attn, layer.mlp
            self.layers.append(
                _Layer(
                    ln1=owned(layer.input_layernorm.weight),
                    qkv=fused_linear(attn.q_proj, attn.k_proj, attn.v_proj, quant=quant),
                    o=Linear(attn.o_proj.weight, attn.o_proj.bias, quant),
                    ln2=owned(layer.post_attention_layernorm.weight),
                    gate_up=fused_linear(mlp.gate_proj, mlp.up_proj, quant=quant),
                    down=Linear(mlp.down_proj.weight, mlp.down_proj.bias, quant),
                )
            )
        self.num_layers = len(self.layers)
        # HF's own rotary module gives exactly its cos/sin (rope_theta, llama3/linear/yarn scaling...).
        positions = torch.arange(round_up(self.max_model_len), device=self.device).unsqueeze(0)
        probe = torch.empty(0, dtype=self.dtype, device=self.device)
        cos, sin = inner.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0].contiguous(), sin[0].contiguous()  # [max_len, head_dim]

    def allocate_kv_cache(self, capacity: int, slot_len: int) -> None:
        super().allocate_kv_cache(capacity, slot_len)
        if self.compiled_decode is None or not self.compiled_decode.needs_warm_up():
            return
        if self._kv_buffers.lazy:
            # Compile beside the first requests: the warm-up writes into a second cache of the same shape, which
            # commits only the few pages it touches.
            self.compiled_decode.start_warm_up(self._kv_buffers_for(capacity))
        else:
            with torch.inference_mode():
                self.compiled_decode.warm_up()  # before serving, on the live cache

    def compiled_decode_state(self) -> CompileState | None:
        return None if self.compiled_decode is None else self.compiled_decode.state

    # --- forward --------------------------------------------------------------------------------------------
    def _rms_norm(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        # HF LlamaRMSNorm exactly (normalise in fp32, cast, scale), with torch's fused kernel for the fp32 part:
        # its bf16 variant is 3-5x slower on CPU.
        return weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)

    @staticmethod
    def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
        return x * cos + rotated * sin

    @torch.inference_mode()
    def run(
        self,
        scheduled: list[tuple[Sequence, int]],
        sample_seqs: list[Sequence],
        sample_rows: list[SamplingRow],
        prompt_logprob_seqs: dict[Sequence, tuple[int, int]],
    ) -> RunOutput:
        """Compute `n` tokens of each scheduled sequence; sample the next token of each of `sample_seqs`
        (whose last known token is in this step), and one after each of its draft tokens; `sample_rows` has an
        entry per sampled row, in that order. Prompt logprobs for `prompt_logprob_seqs`
        (seq -> (top-k, first position still needed))."""
        self.step_threads.before_step(sum(n for _, n in scheduled))
        batch = StepBatch.build(scheduled, sample_seqs, prompt_logprob_seqs, self.device)
        if self.compiled_decode is not None and sample_seqs:
            logits = self.compiled_decode.run(batch)  # None: too many rows or prompt logprobs: eager
            if logits is not None:
                return RunOutput(sampled=self.sampler(logits, sample_rows), prompt_logprobs={})
        hidden = self._forward(batch)
        prompt_lps: dict[Sequence, list[TokenLogprobData]] = {}
        for seq, (rows, targets, num_top) in batch.prompt_rows.items():
            logits = self.lm_head(self._rms_norm(hidden[rows], self.norm))
            prompt_lps[seq] = compute_prompt_logprobs(logits, targets, num_top)
        if not sample_seqs:
            return RunOutput(sampled=SamplerOutput([], []), prompt_logprobs=prompt_lps)
        logits = self.lm_head(self._rms_norm(hidden[batch.sample_index], self.norm))
        return RunOutput(sampled=self.sampler(logits, sample_rows), prompt_logprobs=prompt_lps)

    def embed_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows of the embedding table in the step dtype (the table may be fp16, `lookup_table`)."""
        return self.embed[ids].to(self.dtype)

    def _forward(self, batch: StepBatch) -> torch.Tensor:
        x = self.embed_tokens(batch.input_ids)  # [N, hidden]
        cos = self.cos[batch.positions].unsqueeze(1)  # [N, 1, head_dim]
        sin = self.sin[batch.positions].unsqueeze(1)
        decode_mask = batch.decode_mask(self.slot_len) if batch.decode_rows else None
        for layer, k_flat, v_flat in zip(self.layers, self.k_cache, self.v_cache, strict=True):
            k_cache, v_cache = self._view(k_flat, self.slot_len), self._view(v_flat, self.slot_len)

            def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache=k_cache, v_cache=v_cache):
                k_cache[batch.token_slots, :, batch.positions] = k
                v_cache[batch.token_slots, :, batch.positions] = v
                return self._attention(q, k_cache, v_cache, batch, decode_mask)

            x = self._block(x, layer, cos, sin, attend)
        return x

    def _block(self, x: torch.Tensor, layer: _Layer, cos: torch.Tensor, sin: torch.Tensor, attend) -> torch.Tensor:
        """One decoder layer over flat tokens [N, hidden]; `attend(q, k, v)` does the attention."""
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        qkv = layer.qkv(self._rms_norm(x, layer.ln1))
        qk = self._rotate(qkv[:, : (heads + kv_heads) * dim].view(-1, heads + kv_heads, dim), cos, sin)
        v = qkv[:, (heads + kv_heads) * dim :].view(-1, kv_heads, dim)
        attn = attend(qk[:, :heads], qk[:, heads:], v)
        x = x + layer.o(attn.reshape(-1, heads * dim))
        gate, up = layer.gate_up(self._rms_norm(x, layer.ln2)).chunk(2, dim=-1)
        return x + layer.down(F.silu(gate) * up)

    @torch.inference_mode()
    def hidden_states(self, token_ids: list[int], layers: set[int]) -> dict[int, torch.Tensor]:
        """Hidden states of one input, outside the KV cache (embeddings): layer 0 is the token embeddings,
        layer k the output of block k, the last one after the final norm (as HF `output_hidden_states`)."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        x = self.embed_tokens(ids)
        cos, sin = self.cos[: len(token_ids)].unsqueeze(1), self.sin[: len(token_ids)].unsqueeze(1)

        def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
            q, k, v = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale, enable_gqa=True)
            return out[0].transpose(0, 1)

        states = {0: x} if 0 in layers else {}
        for index, layer in enumerate(self.layers, start=1):
            x = self._block(x, layer, cos, sin, attend)
            if index in layers:
                states[index] = self._rms_norm(x, self.norm) if index == self.num_layers else x
        return states

    def _attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: StepBatch,
        decode_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        if batch.all_decode:  # the common step: no scatter/gather of rows needed
            return self._decode_attention(q, k_cache, v_cache, batch, decode_mask)
        attn = torch.empty_like(q)
        if batch.decode_rows:
            attn[batch.decode_index] = self._decode_attention(
                q[batch.decode_index], k_cache, v_cache, batch, decode_mask
            )
        for start, length, slot, pos in batch.prefill_chunks:
            attn[start : start + length] = self._prefill_attention(
                q[start : start + length], k_cache, v_cache, slot, pos
            )
        return attn

    def _decode_attention(
        self,
        q: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        batch: StepBatch,
        mask: torch.Tensor,
    ) -> torch.Tensor:
        """A few queries per sequence (its next token, plus any draft tokens), as one bmm over the contiguous
        slot cache (13x faster than masked SDPA on CPU). q: [D, heads, head_dim] for rows at
        (`batch.decode_slots`, `batch.decode_offsets`); returns the same shape."""
        slots, window, queries = batch.decode_span, self.slot_len, batch.decode_queries  # whole slots
        group = self.num_heads // self.num_kv_heads
        if batch.dense_decode:  # one query per slot, row i in slot i
            q_full = q
        else:
            q_full = q.new_zeros(slots, queries, self.num_heads, self.head_dim)
            q_full[batch.decode_slots, batch.decode_offsets] = q
            q_full = q_full.transpose(1, 2)  # [slots, heads, queries, head_dim]
        q_full = q_full.reshape(slots * self.num_kv_heads, group * queries, self.head_dim)
        keys = k_cache[:slots, :, :window].reshape(slots * self.num_kv_heads, window, self.head_dim)
        values = v_cache[:slots, :, :window].reshape(slots * self.num_kv_heads, window, self.head_dim)
        scores = torch.bmm(q_full, keys.transpose(1, 2)).float().mul_(self.scale)
        scores = scores.view(slots, self.num_kv_heads, group, queries, window).add_(mask)
        probs = torch.softmax(scores, dim=-1).to(q.dtype).view(slots * self.num_kv_heads, group * queries, window)
        out = torch.bmm(probs, values).view(slots, self.num_heads, queries, self.head_dim)
        if batch.dense_decode:
            return out.view(slots, self.num_heads, self.head_dim)
        return out.transpose(1, 2)[batch.decode_slots, batch.decode_offsets]

    def _prefill_attention(
        self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot: int, pos: int
    ) -> torch.Tensor:
        """Causal attention of a chunk at positions pos.. against everything of its sequence so far."""
        length = q.shape[0]
        total = pos + length
        keys = k_cache[slot, :, :total].unsqueeze(0)  # [1, kv_heads, total, head_dim]
        values = v_cache[slot, :, :total].unsqueeze(0)
        q_pos = torch.arange(pos, total, device=q.device).unsqueeze(1)
        mask = torch.arange(total, device=q.device).unsqueeze(0) <= q_pos
        out = F.scaled_dot_product_attention(
            q.transpose(0, 1).unsqueeze(0), keys, values, attn_mask=mask, scale=self.scale, enable_gqa=True
        )
        return out[0].transpose(0, 1)


@dataclass
class StepBatch:
    """Index tensors for one step, built on the host and moved to the device once."""

    input_ids: torch.Tensor  # [N]
    positions: torch.Tensor  # [N]
    token_slots: torch.Tensor  # [N]
    sample_index: torch.Tensor  # rows whose logits are sampled (1 + drafts per sampled sequence)
    decode_rows: list[int]  # a decode's next token and its draft tokens: queries of the batched decode attention
    decode_index: torch.Tensor
    decode_slots: torch.Tensor  # per decode row
    decode_offsets: torch.Tensor  # per decode row: 0 for the next token, j for the j-th draft
    decode_lengths: list[tuple[int, int]]  # (slot, length attended by its offset-0 query)
    decode_queries: int  # most decode rows of one sequence
    decode_span: int  # highest decode slot + 1
    all_decode: bool  # every row is a single-token step
    dense_decode: bool  # decode row i is in slot i
    prefill_chunks: list[tuple[int, int, int, int]]  # (row start, length, slot, first position)
    prompt_rows: dict[Sequence, tuple[torch.Tensor, list[int], int]]
    device: torch.device

    @classmethod
    def build(
        cls,
        scheduled: list[tuple[Sequence, int]],
        sample_seqs: list[Sequence],
        prompt_logprob_seqs: dict[Sequence, tuple[int, int]],
        device: torch.device,
    ) -> StepBatch:
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        last_row: dict[Sequence, int] = {}
        decode_rows: list[int] = []
        decode_slots: list[int] = []
        decode_offsets: list[int] = []
        decode_lengths: list[tuple[int, int]] = []
        prefill_chunks: list[tuple[int, int, int, int]] = []
        prompt_rows: dict[Sequence, tuple[list[int], list[int], int]] = {}
        for seq, n in scheduled:
            start, pos = len(ids), seq.num_computed_tokens
            ids += seq.step_token_ids(n)
            positions += range(pos, pos + n)
            slots += [seq.slot] * n
            last_row[seq] = start + n - 1
            if n == 1 + len(seq.draft_token_ids):  # a decode, with any drafts
                decode_rows += range(start, start + n)
                decode_slots += [seq.slot] * n
                decode_offsets += range(n)
                decode_lengths.append((seq.slot, pos + 1))
            else:
                prefill_chunks.append((start, n, seq.slot, pos))
            if seq in prompt_logprob_seqs:
                # The row at position i predicts prompt token i+1; skip positions collected before a preemption.
                num_top, needed_from = prompt_logprob_seqs[seq]
                first, last = max(pos, needed_from), min(pos + n, seq.num_prompt_tokens - 1)
                if last > first:
                    rows = list(range(start + first - pos, start + last - pos))
                    prompt_rows[seq] = (rows, seq.token_ids[first + 1 : last + 1], num_top)

        def tensor(values: list[int]) -> torch.Tensor:
            return torch.tensor(values, dtype=torch.long, device=device)

        return cls(
            input_ids=tensor(ids),
            positions=tensor(positions),
            token_slots=tensor(slots),
            # A sequence checking d draft tokens is sampled at its last d + 1 rows.
            sample_index=tensor(
                [
                    row
                    for seq in sample_seqs
                    for row in range(last_row[seq] - len(seq.draft_token_ids), last_row[seq] + 1)
                ]
            ),
            decode_rows=decode_rows,
            decode_index=tensor(decode_rows),
            decode_slots=tensor(decode_slots),
            decode_offsets=tensor(decode_offsets),
            decode_lengths=decode_lengths,
            decode_queries=max(decode_offsets, default=0) + 1,
            decode_span=max(decode_slots, default=-1) + 1,
            all_decode=len(decode_rows) == len(ids),
            dense_decode=decode_slots == list(range(len(decode_slots))),
            prefill_chunks=prefill_chunks,
            prompt_rows={s: (tensor(r), t, k) for s, (r, t, k) in prompt_rows.items()},
            device=device,
        )

    def decode_mask(self, window: int) -> torch.Tensor:
        """Additive mask [slots, 1, 1, queries, window]: 0 up to what each query may see (its sequence's length,
        plus one per draft before it), -inf after; idle slots and padding queries see 1 token (no NaN)."""
        lengths = [1] * self.decode_span
        for slot, length in self.decode_lengths:
            lengths[slot] = length
        offsets = torch.arange(self.decode_queries, device=self.device)
        limit = torch.tensor(lengths, device=self.device).unsqueeze(1) + offsets  # [slots, queries]
        keep = torch.arange(window, device=self.device) < limit.unsqueeze(2)
        mask = torch.zeros(keep.shape, dtype=torch.float32, device=self.device).masked_fill_(~keep, -float("inf"))
        return mask.view(self.decode_span, 1, 1, self.decode_queries, window)
