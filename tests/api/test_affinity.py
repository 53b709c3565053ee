"""The edge's routing choice (api/affinity.py) with a stand-in registry and JetStream: which key a request is routed
by, when it goes to a worker's own subject and when to the shared queue, and the counters /metrics shows."""

from __future__ import annotations

import time
from types import SimpleNamespace

from nats.js import errors as jse

from api.affinity import AFFINE, BUSY, ONE_WORKER, UNAVAILABLE, AffinityRouter, conversation_key, explicit_key
from api.schemas.openai import ChatCompletionRequest, CompletionRequest
from api.serving.metrics import render
from broker import subjects
from broker.affinity import rendezvous_pick, salted_key
from contracts import GenerateRequest

MODEL = "m"


class Catalog:
    def __init__(self, *worker_ids: str, model: str = MODEL, renewed_at: float | None = None):
        renewed_at = time.time() if renewed_at is None else renewed_at
        self.live = [SimpleNamespace(worker_id=w, model=model, updated_at=renewed_at) for w in worker_ids]

    async def workers(self):
        return self.live


class JetStream:
    """consumer_info of the workers' own consumers: `pending` per worker id; a missing id has no consumer."""

    def __init__(self, pending: dict[str, int]):
        self.pending = pending

    async def consumer_info(self, stream: str, consumer: str):
        assert stream == subjects.request_stream(MODEL)
        worker_id = consumer.removeprefix(subjects.AFFINE_CONSUMER_PREFIX)
        if worker_id not in self.pending:
            raise jse.NotFoundError(code=404, err_code=10014, description="consumer not found")
        return SimpleNamespace(num_pending=self.pending[worker_id])


def request(tokens: list[int]) -> GenerateRequest:
    return GenerateRequest(request_id="r", model=MODEL, prompt_token_ids=tokens, reply_subject="inf.tok.e.r")


def router(pending: dict[str, int], *workers: str) -> AffinityRouter:
    return AffinityRouter(JetStream(pending), Catalog(*workers), max_waiting=2, prefix_tokens=4)


async def test_a_key_goes_to_its_workers_own_subject() -> None:
    routing = router({"w1": 0, "w2": 0}, "w1", "w2")
    chosen = rendezvous_pick(salted_key("alice", "user:u1"), ["w1", "w2"])
    assert await routing.subject_for(request([1, 2]), "alice", "user:u1") == subjects.affine_subject(MODEL, chosen)
    assert routing.counts == {(MODEL, AFFINE): 1}


async def test_without_a_key_the_leading_prompt_tokens_decide() -> None:
    """Prompts that agree on their first `prefix_tokens` tokens go to one worker, whatever follows."""
    routing = router({f"w{i}": 0 for i in range(8)}, *(f"w{i}" for i in range(8)))
    first = await routing.subject_for(request([5, 6, 7, 8, 1]), "alice", None)
    assert await routing.subject_for(request([5, 6, 7, 8, 2, 3]), "alice", None) == first
    others = {await routing.subject_for(request([t, 6, 7, 8]), "alice", None) for t in range(20)}
    assert len(others) > 1  # different prefixes spread


async def test_a_busy_worker_sends_the_request_to_the_shared_queue() -> None:
    chosen = rendezvous_pick(salted_key("alice", "k"), ["w1", "w2"])
    pending = {"w1": 2, "w2": 2}  # max_waiting requests already wait on each worker's own subject
    routing = AffinityRouter(JetStream(pending), Catalog("w1", "w2"), max_waiting=2, prefix_tokens=4)
    assert await routing.subject_for(request([1]), "alice", "k") is None
    pending[chosen] = 1
    assert await routing.subject_for(request([1]), "alice", "k") == subjects.affine_subject(MODEL, chosen)
    assert routing.counts == {(MODEL, BUSY): 1, (MODEL, AFFINE): 1}


async def test_shared_queue_with_one_worker_or_without_an_own_consumer() -> None:
    single = router({"w1": 0}, "w1")
    assert await single.subject_for(request([1]), "alice", "k") is None
    no_consumer = router({}, "w1", "w2")  # workers running without affinity
    assert await no_consumer.subject_for(request([1]), "alice", "k") is None
    other_model = AffinityRouter(JetStream({}), Catalog("w1", "w2", model="other"), 2, 4)
    assert await other_model.subject_for(request([1]), "alice", "k") is None
    assert single.counts == {(MODEL, ONE_WORKER): 1}
    assert no_consumer.counts == {(MODEL, UNAVAILABLE): 1}
    assert other_model.counts == {(MODEL, ONE_WORKER): 1}


async def test_a_worker_that_stopped_renewing_its_entry_is_not_chosen() -> None:
    """A SIGKILLed worker stays in the registry until its entry expires; after missing two renewals it is no
    longer chosen, so its keys move to the live workers at once."""
    catalog = Catalog("w1", "w2")
    dead = next(w for w in catalog.live if w.worker_id == rendezvous_pick(salted_key("alice", "k"), ["w1", "w2"]))
    routing = AffinityRouter(JetStream({"w1": 0, "w2": 0}), catalog, 2, 4, stale_after_s=5.0)
    assert await routing.subject_for(request([1]), "alice", "k") == subjects.affine_subject(MODEL, dead.worker_id)
    dead.updated_at -= 6.0
    assert await routing.subject_for(request([1]), "alice", "k") is None  # one fresh worker left: shared queue
    catalog.live.append(SimpleNamespace(worker_id="w3", model=MODEL, updated_at=time.time()))
    chosen = await routing.subject_for(request([1]), "alice", "k")
    assert chosen is not None and chosen != subjects.affine_subject(MODEL, dead.worker_id)


async def test_the_counters_are_on_metrics() -> None:
    pending = {"w1": 5, "w2": 5}
    routing = AffinityRouter(JetStream(pending), Catalog("w1", "w2"), max_waiting=2, prefix_tokens=4)
    await routing.subject_for(request([1]), "alice", "k")
    pending.update(w1=0, w2=0)
    await routing.subject_for(request([1]), "alice", "k")
    await routing.subject_for(request([1]), "bob", "k")
    text = render([], [], None, routing).decode()
    assert 'inferq:affinity_fallback_total{model_name="m",reason="busy"} 1.0' in text
    assert 'inferq:affinity_routed_total{model_name="m"} 2.0' in text


def test_keys_the_client_gives_come_first() -> None:
    body = ChatCompletionRequest(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], prompt_cache_key="conv-1", user="u"
    )
    assert conversation_key(body.messages, explicit_key(body)) == "cache_key:conv-1"
    assert explicit_key(CompletionRequest(model=MODEL, prompt="x", user="u")) == "user:u"
    assert explicit_key(CompletionRequest(model=MODEL, prompt="x")) is None


def test_a_conversation_is_keyed_by_its_opening() -> None:
    """Later turns keep the key of the first; another first question under the same system prompt does not."""
    system = {"role": "system", "content": "a long shared system prompt"}
    turn1 = [system, {"role": "user", "content": "q1"}]
    turn2 = [*turn1, {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    other = [system, {"role": "user", "content": "another question"}]

    def key(messages):
        body = ChatCompletionRequest(model=MODEL, messages=messages)
        return conversation_key(body.messages, explicit_key(body))

    assert key(turn1) == key(turn2)
    assert key(turn1) != key(other)
