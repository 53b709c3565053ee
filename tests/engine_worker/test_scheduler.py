"""Scheduler and KV accounting without a model: budgets, chunked prefill, admission, preemption, priority."""

from __future__ import annotations

import itertools

import pytest

from contracts import SamplingParams
from engine_worker.kv_cache import KVCacheManager
from engine_worker.scheduler import Scheduler, SchedulerOutput
from engine_worker.sequence import Sequence, SequenceStatus

_ids = itertools.count()


def seq(prompt_len: int, *, priority: int = 0, max_tokens: int = 1000) -> Sequence:
    n = next(_ids)
    return Sequence(
        seq_id=n,
        request_id=f"r{n}",
        index=0,
        token_ids=[5] * prompt_len,
        num_prompt_tokens=prompt_len,
        num_resume_tokens=0,
        params=SamplingParams(),
        max_tokens=max_tokens,
        sampling_key=0,
        priority=priority,
        arrival=n,
        eos_token_ids=frozenset(),
        detokenizer=None,  # type: ignore[arg-type]
    )


def make(max_num_seqs: int = 8, budget: int = 64, capacity: int = 4096, max_len: int = 512) -> Scheduler:
    return Scheduler(max_num_seqs, budget, KVCacheManager(capacity, max_num_seqs, max_len))


def step(scheduler: Scheduler) -> SchedulerOutput:
    """One engine step without a model: computed tokens advance, completed sequences get a token."""
    out = scheduler.schedule()
    scheduler.postprocess(out)
    for s, _ in out.scheduled:
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(7)
    return out


def planned(out: SchedulerOutput) -> dict[str, int]:
    return {s.request_id: n for s, n in out.scheduled}


def test_token_budget_splits_prompts_and_keeps_decodes_flowing() -> None:
    scheduler = make(budget=16)
    a, b = seq(4), seq(6)
    scheduler.add(a)
    scheduler.add(b)
    assert planned(step(scheduler)) == {a.request_id: 4, b.request_id: 6}
    long = seq(40)
    scheduler.add(long)
    # Two decodes first, the prompt gets the rest of the budget, for as many steps as it needs.
    assert planned(step(scheduler)) == {a.request_id: 1, b.request_id: 1, long.request_id: 14}
    assert planned(step(scheduler)) == {a.request_id: 1, b.request_id: 1, long.request_id: 14}
    assert planned(step(scheduler)) == {a.request_id: 1, b.request_id: 1, long.request_id: 12}
    assert planned(step(scheduler)) == {a.request_id: 1, b.request_id: 1, long.request_id: 1}
    assert long.num_computed_tokens == 41 and long.num_tokens == 42


def test_a_running_prefill_does_not_starve_later_decodes() -> None:
    scheduler = make(budget=8)
    decoder = seq(3)
    scheduler.add(decoder)
    step(scheduler)
    first = seq(30, priority=-1)  # ranks ahead of `decoder` in the running order once admitted
    scheduler.add(first)
    assert planned(step(scheduler)) == {decoder.request_id: 1, first.request_id: 7}
    assert [s.request_id for s in scheduler.running] == [first.request_id, decoder.request_id]
    # The prefill goes first but leaves one token of budget for the decode behind it.
    assert planned(step(scheduler)) == {first.request_id: 7, decoder.request_id: 1}


def test_sequence_budget() -> None:
    scheduler = make(max_num_seqs=2)
    seqs = [seq(3) for _ in range(3)]
    for s in seqs:
        scheduler.add(s)
    out = step(scheduler)
    assert len(out.scheduled) == 2 and scheduler.waiting[0] is seqs[2]
    assert seqs[2].status is SequenceStatus.WAITING


def test_admission_waits_for_kv_capacity_instead_of_failing() -> None:
    # 512 tokens: four slots of 128 or two of 256.
    scheduler = make(capacity=512, budget=512)
    big = [seq(200), seq(200)]
    small = seq(10)
    for s in [*big, small]:
        scheduler.add(s)
    out = step(scheduler)
    assert {s.request_id for s, _ in out.scheduled} == {big[0].request_id, big[1].request_id}
    assert scheduler.kv.slot_len == 256 and scheduler.waiting[0] is small
    scheduler.finish(big[0])
    assert small.request_id in planned(step(scheduler))


def test_preemption_evicts_the_latest_lowest_priority_and_requeues_it_first() -> None:
    scheduler = make(capacity=512, budget=512)
    urgent, early, late = seq(100, priority=-1), seq(100), seq(100)
    queued = seq(100)
    for s in (urgent, early, late, queued):
        scheduler.add(s)
    step(scheduler)  # four fit in 128-token slots
    assert len(scheduler.running) == 4
    for _ in range(28):  # everyone grows to 128
        step(scheduler)
    out = step(scheduler)  # crossing 128 needs 192-token slots: only two fit
    assert out.preempted == [queued, late]
    assert list(scheduler.waiting) == [late, queued]  # back at the front, in arrival order
    assert late.num_computed_tokens == 0 and late.status is SequenceStatus.WAITING
    assert scheduler.num_preemptions == 2
    assert {s for s, _ in out.scheduled} == {urgent, early}
    assert out.relayout is not None and out.relayout.slot_len == 192
    assert sorted(new for _, new in out.relayout.moves) == [0, 1]
    # Preempted work is recomputed later, prompt and generated tokens together.
    scheduler.finish(urgent)
    scheduler.finish(early)
    out = step(scheduler)
    assert planned(out)[late.request_id] == 129 and late.num_tokens == 130  # sampled again at the end


def test_priority_orders_waiting_then_fifo() -> None:
    scheduler = make(max_num_seqs=1)
    normal1, low, high, normal2 = seq(3), seq(3, priority=2), seq(3, priority=-3), seq(3)
    for s in (normal1, low, high, normal2):
        scheduler.add(s)
    assert list(scheduler.waiting) == [high, normal1, normal2, low]


def test_kv_layout_grows_and_shrinks_with_the_running_set() -> None:
    kv = KVCacheManager(capacity=1024, max_num_seqs=16, max_model_len=512)
    scheduler = Scheduler(16, 1024, kv)
    a = seq(60)
    scheduler.add(a)
    out = step(scheduler)
    assert kv.slot_len == 64 and out.relayout is None and a.slot == 0
    while (out := step(scheduler)).relayout is None:
        assert kv.slot_len == 64
    assert a.num_computed_tokens == 65  # the 65th token's KV did not fit a 64-token slot
    assert kv.slot_len == 128 and out.relayout.moves == [(0, 0)] and out.relayout.copy_len == 64
    long = seq(480)
    scheduler.add(long)
    step(scheduler)
    assert kv.slot_len == 512 and kv.num_slots == 2
    assert kv.usage == pytest.approx(1.0)
    scheduler.finish(long)
    many = [seq(10) for _ in range(5)]
    for s in many:
        scheduler.add(s)
    out = step(scheduler)  # more sequences than 512-token slots: shrink back
    assert out.relayout is not None and kv.slot_len == 128 and len(scheduler.running) == 6
    assert sorted(s.slot for s in scheduler.running) == list(range(6))


def test_slot_lengths_climb_a_ladder_of_multiples_of_64_about_a_quarter_apart() -> None:
    kv = KVCacheManager(capacity=8192, max_num_seqs=4, max_model_len=2000)
    ladder = sorted({kv._level(n) for n in range(1, 2001)})
    assert ladder[:10] == [64, 128, 192, 256, 320, 384, 448, 512, 640, 768]
    assert ladder[-1] == kv.max_slot_len == 2048
    assert all(step % 64 == 0 for step in ladder)
    assert all(b / a <= 1.5 for a, b in zip(ladder[1:], ladder[2:], strict=False))  # no doubling after 64 -> 128
    assert len(ladder) <= 20


def test_kv_capacity_must_hold_one_full_sequence() -> None:
    with pytest.raises(ValueError, match="cannot hold"):
        KVCacheManager(capacity=100, max_num_seqs=4, max_model_len=512)


def test_drafts_use_only_leftover_budget_and_free_kv_and_roll_back() -> None:
    scheduler = make(budget=16, capacity=512, max_len=256)
    a, b = seq(10), seq(10)
    scheduler.add(a)
    scheduler.add(b)
    step(scheduler)
    step(scheduler)  # both prompts are in: a holds 11 tokens of KV, b 10
    a.draft_token_ids = [9] * 20
    waiting = seq(8)
    scheduler.add(waiting)
    out = scheduler.schedule()
    # b decodes and the new prompt is admitted first; a's drafts get the 16 - 1 - 1 - 8 = 6 tokens left.
    assert planned(out) == {a.request_id: 1 + 6, b.request_id: 1, waiting.request_id: 8}
    assert a.draft_token_ids == [9] * 6
    assert scheduler.kv._reserved[a] == 11 + 1 + 6
    scheduler.postprocess(out)
    scheduler.reject_drafts(a, 4)  # two drafts were right
    assert a.num_computed_tokens == 11 + 1 + 2 and scheduler.kv._reserved[a] == 14
    assert a.draft_token_ids == []


def test_drafts_never_preempt() -> None:
    scheduler = make(budget=64, capacity=256, max_len=128)
    running = [seq(60), seq(60)]  # two 64-token slots of four; a third sequence would need 128-token slots
    for s in running:
        scheduler.add(s)
    step(scheduler)
    running[0].draft_token_ids = [1] * 10  # 61 + 10 needs 128-token slots: only two fit, both are taken
    third = seq(60)
    scheduler.add(third)
    out = scheduler.schedule()
    assert not out.preempted
    assert running[0].draft_token_ids == [] and planned(out)[running[0].request_id] == 1
