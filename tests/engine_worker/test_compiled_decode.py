"""The compiled small-step path (engine_worker/compiled_decode.py) against the eager forward: greedy output is
the same token for token (tiny fp32 model), and each row bucket is compiled once, whatever the requests and
their lengths (the slot length changes under it)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from engine_worker.compiled_decode import DEFAULT_BUCKETS, CompiledDecode, bucket_for
from engine_worker.engine import Engine, EngineConfig
from tests.engine_worker.conftest import (
    ScriptedProposer,
    make_request,
    prompt_of,
    record_steps,
    run_workload,
)

ROOM_FOR_EVERY_TESTS_GRAPHS = 64


@pytest.fixture(autouse=True)
def _room_for_every_tests_graphs() -> Iterator[None]:
    # dynamo keeps its graphs per code object, and every CompiledDecode in this process traces the same `_forward`
    # (a worker has one): the module's tests together would pass dynamo's default limit of 8 graphs. dynamo's
    # config is per thread: a warm-up on its own thread needs the same (held_step below).
    import torch._dynamo

    with torch._dynamo.config.patch(recompile_limit=ROOM_FOR_EVERY_TESTS_GRAPHS):
        yield


def test_rows_go_to_the_smallest_bucket_that_holds_them() -> None:
    assert [bucket_for(rows, (1, 2, 4, 8)) for rows in (1, 2, 3, 4, 5, 8, 9)] == [1, 2, 4, 4, 8, 8, None]


def test_the_setting_gives_the_fast_runner_a_compiled_step(tiny_model_dir) -> None:
    from engine_worker.runner_factory import load_runner

    options = {"device": "cpu", "dtype": "float32", "max_model_len": None, "torch_threads": 1}
    runner = load_runner(tiny_model_dir, compile_decode=True, **options)
    assert runner.compiled_decode.buckets == DEFAULT_BUCKETS
    assert runner.compiled_decode.num_compiles == 0  # compiled at warm-up, once the engine allocates the KV cache
    assert load_runner(tiny_model_dir, **options).compiled_decode is None  # off by default


# One bucket instead of the default four keeps the module's compile time down (each bucket is a C++ compile, about
# a minute here): every step of up to 8 rows runs the 8-row graph, so a lone sequence is padded 1 → 8 and several
# sequences share the graph.
TEST_BUCKETS = (8,)


@pytest.fixture(scope="module")
def compiled_engine(engine_factory) -> Engine:
    """One engine for the module with its buckets compiled once, as a warm-up at start does."""
    import torch

    engine = engine_factory()
    runner = engine.runner
    runner.compiled_decode = CompiledDecode(runner, buckets=TEST_BUCKETS, check_guards=True)
    with torch.inference_mode():
        runner.compiled_decode.warm_up()
    assert runner.compiled_decode.num_compiles == len(TEST_BUCKETS)
    return engine


@contextmanager
def no_new_graphs(engine: Engine) -> Iterator[None]:
    """Nothing compiles inside the block: neither our backend (one call per graph) nor dynamo's own count."""
    from torch._dynamo.utils import counters

    compiled = engine.runner.compiled_decode
    ours, dynamos = compiled.num_compiles, counters["stats"]["unique_graphs"]
    yield
    assert compiled.num_compiles == ours, f"{compiled.num_compiles - ours} graphs compiled during the requests"
    assert counters["stats"]["unique_graphs"] == dynamos


def _greedy_alone(engine: Engine, prompt: list[int], max_tokens: int) -> tuple[list[int], set[int]]:
    """One request to completion; its tokens and the slot lengths the cache went through."""
    engine.add_request(make_request("alone", prompt, temperature=0.0, max_tokens=max_tokens))
    tokens: list[int] = []
    slot_lens: set[int] = set()
    while engine.has_unfinished_requests():
        for output in engine.step():
            for choice in output.choices:
                tokens += choice.token_ids
        slot_lens.add(engine.runner.slot_len)
    return tokens, slot_lens


def _record_graphs(compiled: CompiledDecode) -> list:
    """The FX graphs `compiled` hands its backend, as it compiles them."""
    graphs = []
    backend = compiled._backend

    def recording(graph, example_inputs: list) -> object:
        graphs.append(graph)
        return backend(graph, example_inputs)

    compiled._backend = recording
    return graphs


def _calls(graph, name: str) -> int:
    """Calls in `graph` to ops whose name contains `name`."""
    return sum(1 for node in graph.graph.nodes if node.op == "call_function" and name in str(node.target))


@pytest.mark.slow  # compiles graphs with inductor (a C++ compiler): tens of seconds on two shared cores
def test_batch_of_one_decodes_as_the_eager_path_does_across_slot_lengths(
    compiled_engine, engine_factory, hf_greedy
) -> None:
    prompt, max_tokens = prompt_of(40, 3), 150
    with no_new_graphs(compiled_engine):
        got, slot_lens = _greedy_alone(compiled_engine, prompt, max_tokens)
    eager, _ = _greedy_alone(engine_factory(), prompt, max_tokens)
    assert got == eager
    assert got == hf_greedy(prompt, max_tokens)
    compiled = compiled_engine.runner.compiled_decode
    assert compiled.steps_by_bucket[8] >= 50, dict(compiled.steps_by_bucket)  # the decode steps ran compiled
    assert len(slot_lens) >= 3, slot_lens  # 64 → 128 → 192: the window changed under the graph


# (prompt length, max_tokens, step at which it is added): arrivals while others decode, and one prompt longer than
# the step budget, whose 16-token chunks share steps with decodes (eager); with one draft each, up to four
# sequences decode in one compiled 8-row step.
MIXED = [(5, 40, 0), (20, 30, 0), (70, 12, 3), (9, 30, 8)]


@pytest.mark.slow
def test_a_mixed_batch_with_drafts_decodes_as_the_eager_path_does(compiled_engine, engine_factory, hf_greedy) -> None:
    answers = {
        (tuple(prompt_of(length, i)), 0): hf_greedy(prompt_of(length, i), max_tokens)
        for i, (length, max_tokens, _) in enumerate(MIXED)
    }
    config = EngineConfig(dtype="float32", device="cpu", max_num_seqs=8, max_num_batched_tokens=16, torch_threads=1)

    def engine_on(base: Engine) -> Engine:
        # Scripted drafts (every 4th guessed wrong): steps with draft rows, accepted and rejected.
        proposer = ScriptedProposer(answers, max_tokens=1)
        return Engine(config, base.tokenizer, base.runner, base.eos_token_ids, proposer=proposer)

    compiled = compiled_engine.runner.compiled_decode
    before = sum(compiled.steps_by_bucket.values())
    with no_new_graphs(compiled_engine):  # a new engine on the runner: a new KV cache, the same graphs
        engine = engine_on(compiled_engine)
        steps = record_steps(engine)
        got = run_workload(engine, MIXED)
    assert got == run_workload(engine_on(engine_factory()), MIXED)
    for i, (length, _, _) in enumerate(MIXED):
        assert got[f"r{i}"] == answers[(tuple(prompt_of(length, i)), 0)], f"request r{i} diverged from transformers"
    compiled_steps = sum(compiled.steps_by_bucket.values()) - before
    eager_steps = sum(1 for out in steps if out.num_tokens > 8)
    assert compiled_steps > 10 and eager_steps > 0, (compiled_steps, eager_steps)
    assert any(len(out.scheduled) > 1 and out.num_tokens <= 8 for out in steps)  # several sequences in one graph


def test_quantized_weights_run_inside_the_graph_and_dense_ones_through_the_opaque_op(engine_factory) -> None:
    # int8/int4 kernels are aten ops dynamo traces, so a bucket within weight_quant_max_rows calls them in the graph
    # (through the opaque op each call paid a Python round trip: 1.3 ms of a 14 ms SmolLM2 step); a larger bucket
    # runs the dense oneDNN-packed weights, which only the opaque op can call. dynamo's own "eager" backend keeps
    # this test free of a C++ compile; the graphs are the ones inductor gets.
    import torch

    def quantized_engine() -> Engine:
        # fp32 activations (int8's kernel takes them too, slowly): in bf16 the graph's attention rounds differently
        # from the eager one's and the tiny random model's near-tied logits let greedy output part
        return engine_factory(dtype="float32", weight_quant="int8", weight_quant_max_rows=4)

    engine = quantized_engine()
    compiled = CompiledDecode(engine.runner, buckets=(4, 8), backend="eager")
    graphs = _record_graphs(compiled)
    engine.runner.compiled_decode = compiled
    with torch.inference_mode():
        compiled.warm_up()  # bucket 4, then bucket 8

    linears = 4 * engine.runner.num_layers + 1  # q/k/v, o, gate/up, down per layer, and lm_head
    assert [_calls(graph, "_weight_int8pack_mm") for graph in graphs] == [linears, 0]
    assert [_calls(graph, "runner_linear") for graph in graphs] == [0, linears]

    prompt = prompt_of(6, 5)
    with no_new_graphs(engine):
        got, _ = _greedy_alone(engine, prompt, 20)
    assert compiled.steps_by_bucket[4] >= 19  # the decodes ran the 4-row graph, quantized weights inside it
    assert got == _greedy_alone(quantized_engine(), prompt, 20)[0]


def test_each_bucket_is_compiled_at_the_thread_count_its_steps_run_at(engine_factory) -> None:
    # Threads by load: small steps run on small_step_threads. dynamo guards on torch's thread count, so buckets
    # warmed up at the base count compiled again in their first real step (a minute each, every stream stalled).
    import torch

    engine = engine_factory(torch_threads=1, small_step_threads=2, small_step_rows=8)
    compiled = CompiledDecode(engine.runner, buckets=(8,), backend="eager", check_guards=True)
    engine.runner.compiled_decode = compiled
    try:
        with torch.inference_mode():
            compiled.warm_up()
        with no_new_graphs(engine):
            _greedy_alone(engine, prompt_of(6, 7), 6)
        assert compiled.steps_by_bucket[8] >= 5
    finally:
        torch.set_num_threads(1)  # the tests after this one share the process


def test_with_only_the_bucket_guards_each_step_runs_its_own_buckets_graph(engine_factory) -> None:
    # As served (check_guards off), dynamo checks only the guards that tell the buckets' graphs apart: a step of
    # 1, 2 or 3 rows must still run the 1-, 2- and 4-row graph, and decode exactly as the eager path does.
    import torch

    workload = [(5, 14, 0), (9, 10, 3), (7, 8, 5)]  # one sequence decoding, then two, then three
    engine = engine_factory(num_speculative_tokens=0)
    compiled = CompiledDecode(engine.runner, buckets=(1, 2, 4), backend="eager")
    engine.runner.compiled_decode = compiled
    with torch.inference_mode():
        compiled.warm_up()
    got = run_workload(engine, workload)
    assert all(compiled.steps_by_bucket[bucket] > 0 for bucket in (1, 2, 4)), dict(compiled.steps_by_bucket)
    assert got == run_workload(engine_factory(num_speculative_tokens=0), workload)


def test_auto_compiles_on_a_cpu_and_inferq_serve_starts_with_auto(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    from common.settings import Settings
    from engine_worker.compiled_decode import resolve_compile_decode

    assert resolve_compile_decode("auto", torch.device("cpu")) is True
    assert resolve_compile_decode("auto", torch.device("meta")) is False  # not measured off a CPU: only when asked
    assert resolve_compile_decode(True, torch.device("meta")) is True
    assert resolve_compile_decode(False, torch.device("cpu")) is False
    monkeypatch.delenv("INFERQ_COMPILE_DECODE")  # the suite runs eager (tests/conftest.py)
    assert Settings().compile_decode == "auto"
    assert EngineConfig().compile_decode is False  # an engine built by hand compiles only when asked


# The engine_factory config (tests/engine_worker/conftest.py), without drafts.
PLAIN = EngineConfig(
    dtype="float32", device="cpu", max_num_seqs=8, torch_threads=1, weight_quant="none", num_speculative_tokens=0
)


def _next_engine(base: Engine) -> Engine:
    """A new engine on `base`'s runner: it allocates its own KV cache, as a worker's engine does at start, which
    warms the runner's compiled step up if it was not yet (on a CPU, on a thread of its own)."""
    return Engine(PLAIN, base.tokenizer, base.runner, base.eos_token_ids)


def test_on_a_cpu_the_buckets_compile_beside_eager_steps_and_never_write_the_live_cache(engine_factory) -> None:
    # inferq serve's default: the worker serves at once while its buckets compile on a thread of their own. Until
    # every bucket is compiled, steps run eager; the warm-up writes a scratch cache, never the one requests use.
    import threading

    import torch

    base = engine_factory(num_speculative_tokens=0)
    runner = base.runner
    compiled = CompiledDecode(runner, buckets=(1, 2), backend="eager", check_guards=True)
    gate, compiling_threads = threading.Event(), set()
    step = compiled._step

    def held_step(*args):  # the warm-up waits for the test; real steps never get here before it ends
        compiling_threads.add(threading.get_ident())
        assert gate.wait(60)
        with torch._dynamo.config.patch(recompile_limit=ROOM_FOR_EVERY_TESTS_GRAPHS):
            return step(*args)

    compiled._step = held_step
    runner.compiled_decode = compiled
    engine = _next_engine(base)
    assert compiled.state == "compiling" and engine.compiled_decode_state() == "compiling"
    prompt = prompt_of(6, 7)
    eager_tokens, _ = _greedy_alone(engine, prompt, 12)
    assert not compiled.steps_by_bucket  # every step ran eager while the buckets compiled
    live = [buffer.clone() for buffer in (*runner.k_cache, *runner.v_cache)]
    gate.set()
    assert compiled.wait_ready(120)
    assert compiling_threads and threading.get_ident() not in compiling_threads
    assert compiled.state == "ready" and compiled.num_compiles == 2
    # Warm-up rows write slot 0, position 0: in the live cache that would overwrite the request's first K/V.
    assert all(torch.equal(a, b) for a, b in zip(live, (*runner.k_cache, *runner.v_cache), strict=True))
    compiled._step = step
    with no_new_graphs(engine):
        compiled_tokens, _ = _greedy_alone(engine, prompt, 12)
    assert compiled.steps_by_bucket[1] >= 11  # the decodes ran the 1-row graph from then on
    assert compiled_tokens == eager_tokens
    _next_engine(engine)  # a cache of the same size: the graphs fit, nothing compiles again
    assert compiled.state == "ready" and compiled.num_compiles == 2


def test_a_failed_compile_leaves_the_worker_serving_eager(engine_factory) -> None:
    import time

    base = engine_factory(num_speculative_tokens=0)
    compiled = CompiledDecode(base.runner, buckets=(1,), backend="eager")

    def no_compiler(*args):
        raise RuntimeError("inductor found no C++ compiler")

    compiled._step = no_compiler
    base.runner.compiled_decode = compiled
    engine = _next_engine(base)
    deadline = time.monotonic() + 30
    while compiled.state == "compiling" and time.monotonic() < deadline:
        time.sleep(0.05)
    assert engine.compiled_decode_state() == "failed"
    prompt = prompt_of(6, 8)
    assert _greedy_alone(engine, prompt, 8)[0] == _greedy_alone(engine_factory(num_speculative_tokens=0), prompt, 8)[0]
    assert not compiled.steps_by_bucket


def test_two_compiled_steps_in_one_process_never_run_each_others_graphs(engine_factory) -> None:
    # The compiled steps skip dynamo's guards on the runner's weights and layers (fixed once loaded). Two runners in
    # one process, a dense and an int8 one, must still each get a graph of their own and decode as their eager
    # path does: a graph of the one run on the other would call the wrong weights' ops.
    import torch

    engines = [engine_factory(num_speculative_tokens=0), engine_factory(num_speculative_tokens=0, weight_quant="int8")]
    prompt = prompt_of(6, 9)
    for engine in engines:
        compiled = CompiledDecode(engine.runner, buckets=(1,), backend="eager", check_guards=True)
        engine.runner.compiled_decode = compiled
        with torch.inference_mode():
            compiled.warm_up()
        assert compiled.num_compiles == 1
    for engine, eager in zip(engines, (engine_factory(), engine_factory(weight_quant="int8")), strict=True):
        got, _ = _greedy_alone(engine, prompt, 10)
        assert engine.runner.compiled_decode.steps_by_bucket[1] >= 9
        assert got == _greedy_alone(eager, prompt, 10)[0]


@pytest.mark.slow  # compiles the int8 lm_head with inductor (a few seconds)
def test_the_int8_lm_head_runs_inductors_template_through_the_opaque_op_in_eager_and_compiled_steps(
    engine_factory,
) -> None:
    # Inductor's GEMM template needs the weights frozen into a module of their own (int8_template_gemm.py), so the
    # graph must call it, not trace it (tracing would inline the aten op it replaces).
    import torch

    engine = engine_factory(dtype="bfloat16", weight_quant="int8", weight_quant_max_rows=4, num_speculative_tokens=0)
    compiled = CompiledDecode(engine.runner, buckets=(1,), backend="eager", int8_template=True)
    graphs = _record_graphs(compiled)
    engine.runner.compiled_decode = compiled
    lm_head = engine.runner.lm_head
    aten_kernel = lm_head.quant.kernel
    with torch.inference_mode():
        compiled.warm_up()
    assert lm_head.quant.name == "int8-template" and not lm_head.quant.traceable

    layers = engine.runner.num_layers
    assert _calls(graphs[0], "runner_linear") == 1 and _calls(graphs[0], "_weight_int8pack_mm") == 4 * layers

    hidden = torch.randn(3, aten_kernel.q.shape[1]).bfloat16()
    with torch.inference_mode():
        want, got = aten_kernel(hidden).float(), lm_head(hidden).float()
    assert ((got - want).norm() / want.norm()).item() < 1e-2

    template, calls_by_rows = lm_head.quant.kernel, Counter()

    def counting(x: torch.Tensor) -> torch.Tensor:
        calls_by_rows[x.shape[0]] += 1
        return template(x)

    lm_head.quant.kernel = counting
    with no_new_graphs(engine):
        _greedy_alone(engine, prompt_of(6, 5), 20)
    assert compiled.steps_by_bucket[1] >= 19 and calls_by_rows[1] >= 19  # each compiled step ran the template
    engine.runner.compiled_decode = None
    _greedy_alone(engine, prompt_of(6, 6), 10)
    assert calls_by_rows[1] >= 19 + 9  # and so does each eager decode step
