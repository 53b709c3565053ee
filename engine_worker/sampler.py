"""Sampling with vLLM semantics, on the device, with one host transfer per step.

Order (vLLM v1): a structured-output token mask first (tokens the grammar refuses get -inf, so greedy, seeded
and sampled rows alike only ever pick allowed tokens, and reported logprobs are those of the constrained
distribution, as in vLLM); raw logprobs are taken from the model's logits before anything else; then logit_bias and the
min_tokens suppression of stop tokens, then penalties (repetition over prompt+output, frequency and presence
over output). Greedy rows take the argmax of that. Random rows go on: temperature, min_p, top_k/top_p, then an
inverse-CDF draw with one uniform number per row.

Randomness never depends on batch-mates: each row's uniform is a hash of (seed, choice index, position)
computed on the host, so a seeded choice samples the same token whatever else is in the batch, at whatever row,
on whatever device, and a resumed stream continues exactly where the first attempt left off.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from contracts import LOGPROB_FLOOR
from engine_worker.sampling_rows import SamplingRow, TokenLogprobData, row_uniform

NUCLEUS_CANDIDATES = (256, 4096)  # top-k sizes tried before sorting the whole vocabulary


@dataclass(slots=True)
class SamplerOutput:
    token_ids: list[int]
    logprobs: list[TokenLogprobData | None]


class Sampler:
    def __init__(self, device: torch.device) -> None:
        self.device = device

    def _tensor(self, values: list, dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> SamplerOutput:
        """logits: [R, V] for the R rows being sampled (any float dtype)."""
        logits = logits.float()
        self._apply_token_masks(logits, rows)
        lp_rows = [i for i, r in enumerate(rows) if r.wants_logprobs]
        raw_logprobs = torch.log_softmax(logits[lp_rows], dim=-1) if lp_rows else None
        self._apply_bias_and_suppression(logits, rows)
        self._apply_penalties(logits, rows)

        random_rows = [i for i, r in enumerate(rows) if not r.greedy]
        if not random_rows:
            token_ids = logits.argmax(dim=-1)
        else:
            token_ids = torch.empty(len(rows), dtype=torch.long, device=self.device)
            greedy_rows = [i for i, r in enumerate(rows) if r.greedy]
            if greedy_rows:
                greedy_idx = self._tensor(greedy_rows, torch.long)
                token_ids[greedy_idx] = logits[greedy_idx].argmax(dim=-1)
            random_idx = self._tensor(random_rows, torch.long)
            token_ids[random_idx] = self._sample_random(logits[random_idx], [rows[i] for i in random_rows])

        if raw_logprobs is None:
            return SamplerOutput(token_ids=token_ids.tolist(), logprobs=[None] * len(rows))
        return self._with_logprobs(token_ids, raw_logprobs, lp_rows, rows)

    def _apply_token_masks(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        masked = [i for i, r in enumerate(rows) if r.allowed is not None]
        if not masked:
            return
        # Unpacked on the mask thread during the forward pass; this waits for it if it is not done yet.
        refused = torch.from_numpy(np.stack([rows[i].allowed.refused() for i in masked])).to(self.device)
        refused = refused.view(torch.bool)
        if len(masked) == len(rows):  # a fully constrained batch: in place, no gather and scatter
            logits.masked_fill_(refused, -float("inf"))
            return
        index = self._tensor(masked, torch.long)
        logits[index] = logits[index].masked_fill(refused, -float("inf"))

    def _apply_bias_and_suppression(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        bias = [(i, t, b) for i, r in enumerate(rows) for t, b in r.logit_bias.items() if t < logits.shape[1]]
        if bias:
            r_idx, t_idx, values = zip(*bias, strict=True)
            logits.index_put_(
                (self._tensor(list(r_idx), torch.long), self._tensor(list(t_idx), torch.long)),
                self._tensor(list(values), torch.float32),
                accumulate=True,
            )
        suppress = [(i, t) for i, r in enumerate(rows) for t in r.suppress_ids if t < logits.shape[1]]
        if suppress:
            r_idx, t_idx = zip(*suppress, strict=True)
            logits[self._tensor(list(r_idx), torch.long), self._tensor(list(t_idx), torch.long)] = -float("inf")

    def _apply_penalties(self, logits: torch.Tensor, rows: list[SamplingRow]) -> None:
        pen_rows = [i for i, r in enumerate(rows) if r.has_penalties]
        if not pen_rows:
            return
        vocab = logits.shape[1]
        sub = logits[self._tensor(pen_rows, torch.long)]
        counts = torch.zeros_like(sub)
        in_context = torch.zeros_like(sub, dtype=torch.bool)
        for j, i in enumerate(pen_rows):
            out_ids = [t for t in rows[i].output_ids if t < vocab]
            if out_ids:
                ids = self._tensor(out_ids, torch.long)
                counts[j].index_add_(0, ids, torch.ones(len(out_ids), device=self.device))
            ctx_ids = [t for t in rows[i].context_ids if t < vocab]
            if ctx_ids:
                in_context[j, self._tensor(ctx_ids, torch.long)] = True
        rep = self._tensor([rows[i].repetition_penalty for i in pen_rows], torch.float32).unsqueeze(1)
        penalized = torch.where(sub > 0, sub / rep, sub * rep)
        sub = torch.where(in_context, penalized, sub)
        freq = self._tensor([rows[i].frequency_penalty for i in pen_rows], torch.float32).unsqueeze(1)
        pres = self._tensor([rows[i].presence_penalty for i in pen_rows], torch.float32).unsqueeze(1)
        sub = sub - freq * counts - pres * (counts > 0)
        logits[self._tensor(pen_rows, torch.long)] = sub

    def _sample_random(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        temperature = self._tensor([r.temperature for r in rows], torch.float32).unsqueeze(1)
        logits = logits / temperature
        if any(r.min_p > 0 for r in rows):
            probs = torch.softmax(logits, dim=-1)
            min_p = self._tensor([r.min_p for r in rows], torch.float32).unsqueeze(1)
            threshold = probs.amax(dim=-1, keepdim=True) * min_p
            logits = logits.masked_fill(probs < threshold, -float("inf"))
        if any(r.top_k > 0 for r in rows):
            logits = self._top_k(logits, rows)
        p_rows = [i for i, r in enumerate(rows) if r.top_p < 1.0]
        if p_rows:
            index = self._tensor(p_rows, torch.long)
            logits[index] = self._top_p(logits[index], [rows[i].top_p for i in p_rows])
        probs = torch.softmax(logits, dim=-1)
        cdf = probs.cumsum(dim=-1)
        # Never land on the total: float rounding must not select a masked tail token.
        uniforms = self._tensor([min(row_uniform(r.key, r.position), 1.0 - 2**-24) for r in rows], torch.float32)
        target = uniforms.unsqueeze(1) * cdf[:, -1:]
        picked = torch.searchsorted(cdf, target, right=True).squeeze(1)
        return picked.clamp_(max=logits.shape[1] - 1)

    def _top_k(self, logits: torch.Tensor, rows: list[SamplingRow]) -> torch.Tensor:
        vocab = logits.shape[1]
        ks = [min(r.top_k, vocab) if r.top_k > 0 else vocab for r in rows]
        top = torch.topk(logits, max(ks), dim=-1).values
        kth = top.gather(1, self._tensor([k - 1 for k in ks], torch.long).unsqueeze(1))
        return logits.masked_fill(logits < kth, -float("inf"))

    def _top_p(self, logits: torch.Tensor, top_ps: list[float]) -> torch.Tensor:
        """Keep the most likely tokens until their mass reaches top_p (vLLM: a token is dropped when the
        tokens ranked above it already cover top_p). Sorting the vocabulary costs 60-150 ms at 32 x 49k on
        CPU, so look for the nucleus among the top 256, then 4096 tokens first; sort only if it is wider."""
        top_p = self._tensor(top_ps, torch.float32).unsqueeze(1)
        probs = torch.softmax(logits, dim=-1)
        vocab = logits.shape[1]
        for k in (*NUCLEUS_CANDIDATES, vocab):
            if k >= vocab:
                top_probs, top_ids = probs.sort(dim=-1, descending=True)  # a very flat distribution
                break
            top_probs, top_ids = probs.topk(k, dim=-1)
            if not bool((top_probs.sum(dim=-1, keepdim=True) < top_p).any()):  # the nucleus is in here
                break
        drop_ranked = (top_probs.cumsum(dim=-1) - top_probs) >= top_p
        drop = torch.ones_like(logits, dtype=torch.bool).scatter_(1, top_ids, drop_ranked)
        return logits.masked_fill(drop, -float("inf"))

    def _with_logprobs(
        self, token_ids: torch.Tensor, raw: torch.Tensor, lp_rows: list[int], rows: list[SamplingRow]
    ) -> SamplerOutput:
        num_top = max((rows[i].num_logprobs or 0) for i in lp_rows)
        chosen = token_ids[self._tensor(lp_rows, torch.long)].unsqueeze(1)
        chosen_lp = raw.gather(1, chosen)
        rank = (raw > chosen_lp).float().sum(dim=1, keepdim=True) + 1  # a float sum: 10x a bool sum on CPU
        parts = [token_ids.double(), chosen_lp.double().flatten(), rank.double().flatten()]
        if num_top:
            top = torch.topk(raw, num_top, dim=-1)
            parts += [top.indices.double().flatten(), top.values.double().flatten()]
        flat = torch.cat(parts).tolist()  # the one transfer of this step
        n, m = len(rows), len(lp_rows)
        ids = [int(x) for x in flat[:n]]
        lps, ranks = flat[n : n + m], flat[n + m : n + 2 * m]
        top_ids = flat[n + 2 * m : n + 2 * m + m * num_top]
        top_lps = flat[n + 2 * m + m * num_top :]
        out: list[TokenLogprobData | None] = [None] * n
        for j, i in enumerate(lp_rows):
            k = rows[i].num_logprobs or 0
            out[i] = TokenLogprobData(
                logprob=max(lps[j], LOGPROB_FLOOR),
                rank=int(ranks[j]),
                top_ids=[int(x) for x in top_ids[j * num_top : j * num_top + k]],
                top_logprobs=[max(x, LOGPROB_FLOOR) for x in top_lps[j * num_top : j * num_top + k]],
            )
        return SamplerOutput(token_ids=ids, logprobs=out)


@torch.inference_mode()
def compute_prompt_logprobs(logits: torch.Tensor, target_ids: list[int], num_top: int) -> list[TokenLogprobData]:
    """Logprob (raw log-softmax) of each next prompt token, plus the top `num_top` alternatives."""
    device = logits.device
    raw = torch.log_softmax(logits.float(), dim=-1)
    targets = torch.tensor(target_ids, dtype=torch.long, device=device).unsqueeze(1)
    chosen = raw.gather(1, targets)
    rank = (raw > chosen).float().sum(dim=1, keepdim=True) + 1
    parts = [chosen.double().flatten(), rank.double().flatten()]
    if num_top:
        top = torch.topk(raw, num_top, dim=-1)
        parts += [top.indices.double().flatten(), top.values.double().flatten()]
    flat = torch.cat(parts).tolist()
    m = len(target_ids)
    result = []
    for j in range(m):
        result.append(
            TokenLogprobData(
                logprob=max(flat[j], LOGPROB_FLOOR),
                rank=int(flat[m + j]),
                top_ids=[int(x) for x in flat[2 * m + j * num_top : 2 * m + (j + 1) * num_top]],
                top_logprobs=[max(x, LOGPROB_FLOOR) for x in flat[2 * m + m * num_top + j * num_top :][:num_top]],
            )
        )
    return result
