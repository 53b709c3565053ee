"""A compiled decode step for small batches (issue #19, opt-in: `compile_decode`).

At batch 1 a step is a chain of ~5,000 small eager ops: the GEMVs that read the weights, and between them norms,
rotary, SiLU, residual adds, KV writes and the few ops of decode attention, each paying the dispatcher and the
interpreter. `torch.compile` turns one whole decode step (embedding → 30 layers → final norm → `lm_head`) into
one graph with those elementwise ops fused; the GEMMs stay the runner's own calls.

Shapes, so that nothing recompiles per request or per sequence length:
- **Dense GEMMs run as opaque ops** (`inferq::runner_linear`): the runner's dense weights are oneDNN pre-packed
  tensors, which inductor accepts only as constants it packed itself (freezing, which would keep a second copy of
  every weight), so the graph calls each `Linear` (linear.py) through a custom op that dynamo does not look into.
  **Quantized GEMMs run in the graph**: a bucket within the rows the int8/int4 copies cover (docs/quantization.md)
  calls their aten kernels directly, which dynamo traces like any op. Which one a linear uses is fixed per bucket
  (the row count is static), as the eager path decides it per step. The custom op's round trip through Python
  cost ~10 µs a call, 1.3 ms of a 14 ms SmolLM2 step at batch 1.
- **Rows are bucketed** (1, 2, 4 by default) and padded: a step of 3 decodes runs the 4-row graph. One graph
  per bucket, all compiled at warm-up (`dynamic=False`: every other shape is static).
- **The slot layout is the one symbolic size.** Decode attention reads whole slots of the slot cache
  (kv_cache.py), whose slot length follows the longest running sequence up a ladder of lengths. The graph takes
  the flat per-layer K/V buffers (fixed shapes) and an empty `[slots, slot_len, 0]` tensor with both sizes marked
  dynamic, and views the buffers itself, so it is compiled once for any slot length; what each row may see is a
  mask built in the graph from its position (no slicing by a host-side length, no `.item()`, no host sync).
- **Padding rows copy row 0** (token, position, slot), and the KV write takes row 0's K/V for them, so a padding
  row writes exactly the value row 0 writes to the same place: no scratch slot, and the duplicate write is
  deterministic. Their logits are dropped.

Every row is treated alike: it writes its K/V at (its slot, its position) and attends to its slot up to its own
position. That is a decode, a decode's draft tokens (speculative decoding), and a short prefill chunk all at once,
so any step of at most the largest bucket's rows runs compiled, drafts and mixed steps included. Steps that asked
for prompt logprobs, and larger steps (compute-bound, where dispatch overhead is a small share), run the eager
forward.

On CUDA the same structure is what CUDA graphs need (static shapes per bucket, no host syncs, inputs in place):
see docs/compiled-decode.md for what to change there.
"""

from __future__ import annotations

import dataclasses
import functools
import gc
import threading
import time
import types
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, Literal

import structlog
import torch

from engine_worker.int8_template_gemm import compile_int8_gemm
from engine_worker.kv_memory import KVBuffers, commits_lazily
from engine_worker.weight_quant import Int8WeightOnly

if TYPE_CHECKING:
    from engine_worker.model_runner import ModelRunner, StepBatch

log = structlog.get_logger(__name__)

# The rows where a step is most dispatch-bound: the int4/int8 weight copies cover up to 4 rows
# (weight_quant_max_rows) and drafted steps stay within 4 (speculative_max_rows), so 1-4 streams run compiled.
# An 8-row bucket (dense GEMMs through the opaque op) cost ~50 s at every start (inductor's cache does not take the
# opaque op) and ~50 MiB of dynamo's retained graph state, for 5-8 streams only.
DEFAULT_BUCKETS = (1, 2, 4)

CompileState = Literal["compiling", "ready", "failed"]

# The runner linears the compiled graphs call, by handle (the op takes an int, not the packed weight). Filled when
# a CompiledDecode is built; an entry lives as long as the process (a worker has one runner). Handles count up from
# 0 in the order the linears are wrapped, so a restarted worker's graphs hold the same constants as before and come
# from inductor's on-disk cache (an `id()` differed in every process: a graph with the op missed the cache, ~1
# minute per bucket at every start).
_LINEARS: dict[int, tuple[Callable[[torch.Tensor], torch.Tensor], int]] = {}


@functools.cache
def _linear_op() -> Callable[[torch.Tensor, int], torch.Tensor]:
    """`inferq::runner_linear(x, handle)`, registered the first time a compiled step is built."""

    @torch.library.custom_op("inferq::runner_linear", mutates_args=())
    def runner_linear(x: torch.Tensor, handle: int) -> torch.Tensor:
        return _LINEARS[handle][0](x)

    @runner_linear.register_fake
    def _(x: torch.Tensor, handle: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], _LINEARS[handle][1])

    return runner_linear


class _OpaqueLinear:
    """Calls a runner `Linear` (linear.py): its quantized copy's kernel directly where that applies to the call's
    rows (a traced aten op), else through `inferq::runner_linear`, so the traced graph holds a handle, not the
    oneDNN-packed dense weights."""

    def __init__(self, linear: Any) -> None:
        self.handle = len(_LINEARS)
        _LINEARS[self.handle] = (linear, linear.out_features)
        self.op = _linear_op()
        self.quant = linear.quant

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.quant is not None and self.quant.traceable and self.quant.applies_to(x.shape[0]):
            return self.quant(x)
        return self.op(x, self.handle)


def resolve_compile_decode(setting: bool | Literal["auto"], device: torch.device) -> bool:
    """`auto` compiles on a CPU, where it was measured (under serve on 2 cores, 1.47x eager at one stream and 1.45x
    at four: docs/compiled-decode.md) and where the KV cache commits lazily, so the warm-up can run beside the first
    requests on scratch buffers that cost no memory. Elsewhere (CUDA: CUDA graphs are not wired yet, and nothing
    was measured) only when asked."""
    if setting == "auto":
        return commits_lazily(device)
    return bool(setting)


def _own_forward(compiled: CompiledDecode) -> Callable[..., torch.Tensor]:
    """`compiled._forward` on a code object of its own. dynamo keeps its graphs per code object; with the runner's
    guards gone (`_without_runner_guards`), a graph of one instance is then never tried for another (tests build
    several, on differently quantized runners), whatever the remaining guards tell apart."""
    function = CompiledDecode._forward
    own = types.FunctionType(function.__code__.replace(), function.__globals__, function.__name__)
    return types.MethodType(own, compiled)


def _without_runner_guards(entries: list[Any]) -> list[bool]:
    """Keep every guard but those on `self`'s attribute chains: the runner's weights, norms, rotary tables and layer
    objects (~1,500 of ~1,950 guards for SmolLM2), which are fixed once the runner is loaded. Checking them cost
    ~0.8 ms of dynamo's ~1 ms lookup per step (profiler, engine alone, batch 1). The guards on the step's own inputs
    (rows per bucket, the slot layout, the KV buffers) and on torch's state stay."""
    return [not (entry.name.startswith("self") or entry.name.startswith("type(self")) for entry in entries]


def bucket_for(rows: int, buckets: Sequence[int]) -> int | None:
    """The smallest bucket holding `rows`, or None when the step is larger than every bucket."""
    return next((b for b in sorted(buckets) if rows <= b), None)


class CompiledDecode:
    """The compiled small step of one `ModelRunner`. `run(batch)` returns the logits of the sampled rows, or None
    when the step is too large, asked for prompt logprobs, or comes before every bucket is compiled (the caller
    then runs the eager forward)."""

    def __init__(
        self,
        runner: ModelRunner,
        buckets: Sequence[int] = DEFAULT_BUCKETS,
        backend: str = "inductor",
        check_guards: bool = False,
        int8_template: bool | None = None,
    ):
        self.runner = runner
        self.layers = [
            dataclasses.replace(
                layer, **{name: _OpaqueLinear(getattr(layer, name)) for name in ("qkv", "o", "gate_up", "down")}
            )
            for layer in runner.layers
        ]
        self.lm_head = _OpaqueLinear(runner.lm_head)
        self.buckets = tuple(sorted(set(buckets)))
        # dynamo checks its guards before every call. Those on the runner's attribute chains are not installed at
        # all (`_without_runner_guards`); of the rest, every bucket is compiled at warm-up and nothing a guard
        # watches changes between steps (the slot layout is symbolic), so steps check only the guards that tell
        # the buckets' graphs apart (`skip_guard_eval_unsafe`). Tests run with all remaining guards
        # (`check_guards`) to prove real steps pass them.
        self.check_guards = check_guards
        self.num_compiles = 0  # graphs built (one per bucket; more means a recompile, which tests assert against)
        self.steps_by_bucket: Counter[int] = Counter()  # steps run compiled
        self._backend = torch._dynamo.lookup_backend(backend)
        # The int8 lm_head through inductor's own GEMM template (`_compile_lm_head`): with the inductor backend
        # unless told; tests' `eager` backend keeps the aten kernel.
        self.int8_template = backend == "inductor" if int8_template is None else int8_template
        self._step = torch.compile(
            _own_forward(self),
            backend=self._counting_backend,
            dynamic=False,
            fullgraph=True,
            options={"guard_filter_fn": _without_runner_guards},
        )
        self._pad_index: dict[tuple[int, int], torch.Tensor] = {}
        self._layout: torch.Tensor | None = None
        # Set once every bucket is compiled; read by the engine thread each step and by the worker's announcements
        # (`state`), so a thread-safe flag rather than engine state.
        self._ready = threading.Event()
        self._failed = False
        self._warmed_capacity: int | None = None

    def _counting_backend(self, graph: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable[..., Any]:
        self.num_compiles += 1
        log.info("compiled decode: compiling a graph", compiles=self.num_compiles, inputs=len(example_inputs))
        return self._backend(graph, example_inputs)

    @property
    def state(self) -> CompileState:
        """Safe to read from any thread."""
        return "ready" if self._ready.is_set() else "failed" if self._failed else "compiling"

    def wait_ready(self, timeout_s: float) -> bool:
        """Block until every bucket is compiled (True) or `timeout_s` passes (False)."""
        return self._ready.wait(timeout_s)

    def needs_warm_up(self) -> bool:
        """Until the buckets are compiled for the runner's cache as it is now: the graphs take its flat buffers at
        their static size, so a cache of another capacity needs them again."""
        return self._warmed_capacity != self.runner.capacity

    def warm_up(self, scratch: KVBuffers | None = None) -> None:
        """Compile every bucket now rather than in the first request that reaches it, which would stall every
        running stream for the compile; steps run compiled from then on. Without `scratch` each warm-up row writes
        K/V at position 0 of slot 0 of the live cache, which any sequence given that slot writes before it reads,
        so nothing may step meanwhile. With `scratch` (buffers shaped like the cache's K then V) the warm-up
        writes only there, so steps may run eager on the live cache meanwhile (`start_warm_up`). Inductor keeps
        the compiled code in its on-disk cache, so a restart with the same model and torch compiles much faster."""
        self._begin_warm_up()
        self._compile_buckets(scratch)

    def start_warm_up(self, scratch: KVBuffers) -> None:
        """`warm_up` on a thread of its own, into `scratch`, while the engine steps eager: the worker serves at
        once and its small steps speed up when the compile ends (~20 s for SmolLM2 from inductor's cache, 2-3
        minutes on a new machine). A failed compile leaves the steps eager, logged, rather than stopping a serving
        worker. The thread ends with the warm-up, and with it the OpenMP pool its steps made (loading_thread.py
        says why that matters)."""
        self._begin_warm_up()

        def compile_or_log() -> None:
            try:
                with torch.inference_mode():  # as the runner's steps run: dynamo guards on it
                    self._compile_buckets(scratch)
            except Exception:
                self._failed = True
                log.exception("compiled decode: compile failed, small steps stay eager")
            # dynamo keeps ~100,000 objects per graph (FX nodes, fake tensors, guards) for the process's life: out
            # of the cyclic collector's full scans, which would walk them all again and again.
            gc.freeze()

        threading.Thread(target=compile_or_log, name="compiled-decode-warm-up", daemon=True).start()
        log.info(
            "compiled decode: compiling in the background, steps run eager until it is in use",
            buckets=list(self.buckets),
        )

    def _begin_warm_up(self) -> None:
        # Steps run eager until every bucket is compiled for this cache (never a graph of the previous one).
        self._ready.clear()
        self._failed = False
        self._warmed_capacity = self.runner.capacity

    def _compile_lm_head(self) -> None:
        """The int8 `lm_head` copy on a CPU through inductor's GEMM template (int8_template_gemm.py), before the
        buckets, whose graphs then call it through the opaque op; eager small steps use it too. Compiled at the
        thread count of a small step (the template's is fixed when it is generated)."""
        quant = self.runner.lm_head.quant
        if not (
            self.int8_template
            and self.runner.device.type == "cpu"
            and quant is not None
            and isinstance(quant.kernel, Int8WeightOnly)
            and quant.kernel.scale.dtype == torch.bfloat16  # measured in bf16 (the int8 default's dtype) only
        ):
            return
        self.runner.step_threads.before_step(1)
        try:
            quant.use_compiled_kernel(compile_int8_gemm(quant.kernel), "int8-template")
        except Exception:
            log.exception("compiled decode: the int8 lm_head template did not compile, it stays on the aten kernel")

    def _compile_buckets(self, scratch: KVBuffers | None) -> None:
        device = self.runner.device
        self._compile_lm_head()
        if scratch is None:
            views = self._cache_views()
        else:
            layers = len(self.layers)
            views = (self._layout_of(self.runner.slot_len), scratch.buffers[:layers], scratch.buffers[layers:])
        for bucket in self.buckets:
            # At the thread count its steps will run at (threads by load, step_threads.py): dynamo guards on
            # torch's thread count, so a bucket compiled at another count compiled again in its first real step.
            self.runner.step_threads.before_step(bucket)
            started = time.perf_counter()
            # Four separate tensors, as a real step passes: dynamo guards on which inputs alias each other.
            ids, positions, slots, rows = (torch.zeros(bucket, dtype=torch.long, device=device) for _ in range(4))
            self._step(ids, positions, slots, rows, *views)
            log.info(
                "compiled decode: bucket ready",
                rows=bucket,
                threads=torch.get_num_threads(),
                seconds=round(time.perf_counter() - started, 1),
            )
        # Nothing compiles again: the compile worker processes inductor started (a Python with torch each) can go.
        from torch._inductor.async_compile import shutdown_compile_workers

        shutdown_compile_workers()
        self._ready.set()
        log.info("compiled decode: in use", buckets=list(self.buckets))

    def run(self, batch: StepBatch) -> torch.Tensor | None:
        rows = batch.input_ids.shape[0]
        bucket = None if batch.prompt_rows else bucket_for(rows, self.buckets)
        if bucket is None or not self._ready.is_set():
            return None
        self.steps_by_bucket[bucket] += 1
        index = self._padding(rows, bucket)
        with torch.compiler.set_stance("default", skip_guard_eval_unsafe=not self.check_guards):
            logits = self._step(
                batch.input_ids[index], batch.positions[index], batch.token_slots[index], index, *self._cache_views()
            )
        return logits[batch.sample_index]

    def _padding(self, rows: int, bucket: int) -> torch.Tensor:
        """Row i of the padded step reads row `index[i]`: itself for real rows, row 0 for padding rows."""
        key = (rows, bucket)
        if key not in self._pad_index:
            self._pad_index[key] = torch.tensor(
                list(range(rows)) + [0] * (bucket - rows), dtype=torch.long, device=self.runner.device
            )
        return self._pad_index[key]

    def _cache_views(self) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
        """What the graph needs to view the KV cache: every layer's flat K and V buffer (fixed shapes) and the
        slot layout (`_layout_of`), rebuilt when the slot length changes."""
        runner = self.runner
        if self._layout is None or self._layout.shape[1] != runner.slot_len:
            self._layout = self._layout_of(runner.slot_len)
        return self._layout, runner.k_cache, runner.v_cache

    def _layout_of(self, slot_len: int) -> torch.Tensor:
        """An empty `[slots, slot_len, 0]` tensor whose two sizes are marked dynamic, so the slot layout reaches
        the graph as two symbols (a relayout to another length reuses the graph; marking the 2 x layers views
        themselves dynamic gave inductor hundreds of symbols to reason about)."""
        layout = torch.empty((self.runner.capacity // slot_len, slot_len, 0), device=self.runner.device)
        torch._dynamo.mark_dynamic(layout, 0)
        torch._dynamo.mark_dynamic(layout, 1)
        return layout

    def _forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        slots: torch.Tensor,
        kv_rows: torch.Tensor,
        layout: torch.Tensor,
        k_flats: list[torch.Tensor],
        v_flats: list[torch.Tensor],
    ) -> torch.Tensor:
        """The traced step: [B] rows in, [B, vocab] logits out."""
        runner = self.runner
        x = runner.embed_tokens(input_ids)
        cos = runner.cos[positions].unsqueeze(1)
        sin = runner.sin[positions].unsqueeze(1)
        num_slots, window = layout.shape[0], layout.shape[1]
        shape = (num_slots, runner.num_kv_heads, window, runner.head_dim)

        def view(flat: torch.Tensor) -> torch.Tensor:  # the runner's slot view (SlotKVCache._view), traced
            return flat[: num_slots * runner.num_kv_heads * window * runner.head_dim].view(shape)

        # Row i sees positions 0..positions[i] of its slot (its own token's K/V is written before attending).
        visible = torch.arange(window, device=positions.device) <= positions.unsqueeze(1)
        mask = torch.zeros(visible.shape, dtype=torch.float32, device=positions.device)
        mask = mask.masked_fill(~visible, float("-inf"))[:, None, None, :]  # [B, 1, 1, window]
        # Where each row's K/V goes in the flat buffers: element (slot, head, position, d) of the slot view. The
        # write is an index_put_ on the graph input itself, which inductor does in place; written through the slot
        # view, the mutation was functionalized into a copy of every layer's whole buffer per step (119 ms a step
        # with a 0.5 GiB cache, ~0.6 s with the default 2 GiB, against 12 ms for the rest of the step).
        heads = torch.arange(runner.num_kv_heads, device=positions.device)
        token_rows = (slots.unsqueeze(1) * runner.num_kv_heads + heads) * window + positions.unsqueeze(1)
        elements = token_rows.unsqueeze(2) * runner.head_dim + torch.arange(runner.head_dim, device=positions.device)
        for layer, k_flat, v_flat in zip(self.layers, k_flats, v_flats, strict=True):
            k_cache, v_cache = view(k_flat), view(v_flat)

            def attend(
                q: torch.Tensor,
                k: torch.Tensor,
                v: torch.Tensor,
                k_flat=k_flat,
                v_flat=v_flat,
                k_cache=k_cache,
                v_cache=v_cache,
            ):
                k_flat.index_put_((elements,), k[kv_rows])  # [B, kv_heads, head_dim] at [B, kv_heads, head_dim]
                v_flat.index_put_((elements,), v[kv_rows])
                return self._attention(q, k_cache[slots], v_cache[slots], mask)

            x = runner._block(x, layer, cos, sin, attend)
        return self.lm_head(runner._rms_norm(x, runner.norm))

    def _attention(self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor):
        """q [B, heads, dim] against each row's own slot, keys/values [B, kv_heads, window, dim].

        Written as broadcast products and sums, not matmuls: inductor fuses each into one reduction kernel that
        reads the slot once, in fp32, where a matmul stays an extern bmm call. At one row those bmm calls cost
        ~20 µs each, 60 a step: 1.2 ms of an 11 ms SmolLM2 step (docs/compiled-decode.md)."""
        runner = self.runner
        rows, kv_heads = q.shape[0], runner.num_kv_heads
        q = q.reshape(rows, kv_heads, runner.num_heads // kv_heads, 1, runner.head_dim).float()
        scores = (q * keys.unsqueeze(2).float()).sum(-1) * runner.scale + mask  # [B, kv, group, window]
        probs = torch.softmax(scores, dim=-1)
        attended = (probs.unsqueeze(-1) * values.unsqueeze(2).float()).sum(-2)  # [B, kv, group, dim]
        return attended.to(keys.dtype).reshape(rows, runner.num_heads, runner.head_dim)
