"""The generic model path: any transformers causal LM whose modeling code uses the attention interface, run
through its own layers with the engine's attention and KV cache plugged in (generic_attention.py), the way
vLLM's Transformers backend works.

Each step is one call of the model on the step's tokens as a flat `[1, N]` sequence with per-token
`position_ids`; `logits_to_keep` selects the rows that are sampled or need prompt logprobs, so the model's own
head computes them (final-logit soft-capping, logit scaling and the like included). The runner offers the same
interface as the fast path (model_runner.ModelRunner), so the engine, scheduler, sampler and KV accounting are
unchanged. It costs the model's Python module overhead per layer and unfused projections; the fast path is kept
for the llama layout (runner_factory.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine_worker.generic_attention import (
    ATTENTION_NAME,
    StepAttention,
    UnsupportedModelFeature,
    register_engine_attention,
)
from engine_worker.model_runner import (
    RunOutput,
    SlotKVCache,
    StepBatch,
    check_rope_scaling,
)
from engine_worker.sampler import SamplerOutput, SamplingRow, TokenLogprobData, compute_prompt_logprobs
from engine_worker.sequence import Sequence

# Config attributes whose semantics the engine's attention does not implement, by the feature they name.
_UNSUPPORTED_CONFIG = {
    "attention_chunk_size": "chunked local attention (attention_chunk_size)",
    "num_kv_shared_layers": "KV sharing between layers (num_kv_shared_layers)",
    "cross_attention_layers": "cross-attention layers",
}


def check_generic_support(config: Any, model_class: type) -> None:
    """Refuse, naming the feature, what the generic path cannot run; before any weights are loaded."""
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{config.model_type!r} is an encoder-decoder model; the engine serves decoders")
    if not getattr(model_class, "_supports_attention_backend", False):
        raise ValueError(
            f"{model_class.__name__} does not support transformers' attention interface, which the generic model "
            "path plugs the engine's KV cache into"
        )
    for name, feature in _UNSUPPORTED_CONFIG.items():
        if getattr(config, name, None):
            raise ValueError(f"unsupported model feature: {feature}")
    check_rope_scaling(config)


class GenericRunner(SlotKVCache):
    """Same interface as model_runner.ModelRunner: run(), hidden_states(), the KV cache methods, and the
    attributes the engine reads (device, dtype, vocab_size, num_layers, max_model_len)."""

    def __init__(
        self,
        model_dir: str | Path,
        *,
        device: str,
        dtype: str,
        max_model_len: int | None,
        torch_threads: int | None,
    ) -> None:
        from transformers import AutoModelForCausalLM
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        config = self._start_loading(model_dir, device, dtype, torch_threads)
        try:
            model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
        except KeyError:
            raise ValueError(f"{config.model_type!r} has no causal-LM class in transformers") from None
        text = config.get_text_config()
        check_generic_support(text, model_class)
        register_engine_attention()
        self.model = (
            AutoModelForCausalLM.from_pretrained(model_dir, dtype=self.dtype, attn_implementation=ATTENTION_NAME)
            .to(self.device)
            .eval()
        )
        self.vocab_size = text.vocab_size
        self.num_layers = text.num_hidden_layers
        self.num_kv_heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
        self.head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        model_len = getattr(text, "max_position_embeddings", None) or max_model_len
        if model_len is None:
            raise ValueError("the model config has no max_position_embeddings: set max_model_len")
        self.max_model_len = min(max_model_len or model_len, model_len)
        self._probe()
        self._log_loaded(model_dir, model_impl="generic", architecture=type(self.model).__name__)

    @torch.inference_mode()
    def _probe(self) -> None:
        """Run three tokens through every layer once: an attention argument we do not implement, or a layer
        whose KV shape differs from the config's (the cache is uniform), is refused now rather than mid-request."""
        step = StepAttention()
        try:
            self._call(torch.tensor([0, 1, 2], device=self.device), torch.arange(3, device=self.device), step)
        except UnsupportedModelFeature as exc:
            raise ValueError(f"unsupported model feature: {exc}") from exc
        expected = dict.fromkeys(range(self.num_layers), (self.num_kv_heads, self.head_dim))
        if step.kv_shapes != expected:
            raise ValueError(
                "unsupported model feature: layers whose attention differs from the config's "
                f"{self.num_kv_heads} KV heads x {self.head_dim} (or layers without attention): {step.kv_shapes}"
            )

    def _call(
        self,
        ids: torch.Tensor,
        positions: torch.Tensor,
        step: StepAttention,
        logits_rows: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> Any:
        kwargs: dict[str, Any] = {"output_hidden_states": output_hidden_states} if output_hidden_states else {}
        if logits_rows is None:  # hidden states only
            return self.model.model(
                input_ids=ids.unsqueeze(0),
                position_ids=positions.unsqueeze(0),
                use_cache=False,
                inferq_step=step,
                **kwargs,
            )
        return self.model(
            input_ids=ids.unsqueeze(0),
            position_ids=positions.unsqueeze(0),
            use_cache=False,
            logits_to_keep=logits_rows,
            inferq_step=step,
            **kwargs,
        )

    @torch.inference_mode()
    def run(
        self,
        scheduled: list[tuple[Sequence, int]],
        sample_seqs: list[Sequence],
        sample_rows: list[SamplingRow],
        prompt_logprob_seqs: dict[Sequence, tuple[int, int]],
    ) -> RunOutput:
        """As ModelRunner.run."""
        batch = StepBatch.build(scheduled, sample_seqs, prompt_logprob_seqs, self.device)
        step = StepAttention(
            batch=batch,
            k_cache=[self._view(flat, self.slot_len) for flat in self.k_cache],
            v_cache=[self._view(flat, self.slot_len) for flat in self.v_cache],
        )
        prompt_parts = list(batch.prompt_rows.items())
        rows = torch.cat([batch.sample_index, *(rows for _, (rows, _, _) in prompt_parts)])
        logits = self._call(batch.input_ids, batch.positions, step, logits_rows=rows).logits[0]
        prompt_lps: dict[Sequence, list[TokenLogprobData]] = {}
        offset = len(batch.sample_index)
        for seq, (seq_rows, targets, num_top) in prompt_parts:
            prompt_lps[seq] = compute_prompt_logprobs(logits[offset : offset + len(seq_rows)], targets, num_top)
            offset += len(seq_rows)
        if not sample_seqs:
            return RunOutput(sampled=SamplerOutput([], []), prompt_logprobs=prompt_lps)
        return RunOutput(
            sampled=self.sampler(logits[: len(batch.sample_index)], sample_rows), prompt_logprobs=prompt_lps
        )

    @torch.inference_mode()
    def hidden_states(self, token_ids: list[int], layers: set[int]) -> dict[int, torch.Tensor]:
        """As ModelRunner.hidden_states: transformers' `output_hidden_states` (embeddings, each layer's output,
        the last one after the final norm), outside the KV cache."""
        ids = torch.tensor(token_ids, dtype=torch.long, device=self.device)
        out = self._call(
            ids, torch.arange(len(token_ids), device=self.device), StepAttention(), output_hidden_states=True
        )
        states = out.hidden_states
        return {index: states[index][0] for index in layers}
