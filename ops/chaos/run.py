"""One chaos run: bring the system up, take the undisturbed references, run the mixed workload while the seeded
schedule kills and freezes processes, then a steady phase without faults (RSS sampled at its start and end),
then check the invariants. `run_chaos` returns a report; every failure line in it names the seed."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import structlog
from nats.js import JetStreamContext

from broker import subjects
from broker.connection import connect
from ops.chaos.ledger import Ledger, accepted_attempts
from ops.chaos.schedule import fault_schedule
from ops.chaos.system import MODEL, ChaosSystem, NotReady
from ops.chaos.workload import (
    BATCH_DEADLINE_S,
    DIRECT_PROMPT_LENGTHS,
    PROMPTS,
    REQUEST_DEADLINE_S,
    References,
    Workload,
    chat_body,
    direct_request,
)

log = structlog.get_logger(__name__)
RSS_GROWTH_BOUND = (0.15, 32 * 2**20)  # flat: the larger of 15 % and 32 MiB over the steady phase


@dataclass(frozen=True, slots=True)
class ChaosConfig:
    minutes: float  # of faults; start-up, references, the steady phase and the checks come on top
    seed: int
    root: Path
    streaming_clients: int = 4
    keyed_clients: int = 3
    direct_clients: int = 2
    batch_lines: int = 16
    steady_s: float = 30.0
    tokens_per_s: float = 20.0


@dataclass
class ChaosReport:
    seed: int
    faults: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)
    rss: dict[str, tuple[int, int]] = field(default_factory=dict)  # process → (steady start, steady end) bytes
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems

    def render(self) -> str:
        rss = ", ".join(f"{name} {start / 2**20:.0f}→{end / 2**20:.0f} MiB" for name, (start, end) in self.rss.items())
        lines = [
            f"chaos run, seed {self.seed}: {'PASSED' if self.ok else 'FAILED'} in {self.seconds:.0f} s, "
            f"{len(self.faults)} faults",
            f"  requests: {self.summary.get('requests')}",
            f"  clear errors: {self.summary.get('errors')}; slowest request {self.summary.get('slowest_s')} s; "
            f"{self.summary.get('keys')} Idempotency-Keys",
            f"  RSS over the steady phase: {rss}",
            "  faults: " + "; ".join(self.faults),
        ]
        lines += [f"  FAILURE (seed {self.seed}): {problem}" for problem in self.problems]
        if not self.ok:
            lines.append(f"  reproduce: inferq chaos --seed {self.seed} --minutes <same>")
        return "\n".join(lines)


async def run_chaos(config: ChaosConfig) -> ChaosReport:
    started = time.monotonic()
    report, ledger = ChaosReport(config.seed), Ledger(config.seed)
    system = ChaosSystem(config.root, tokens_per_s=config.tokens_per_s)
    try:
        await system.start()
        async with connect(system.cluster.urls, "inferq-chaos-direct") as nc:
            js = nc.jetstream()
            workload = Workload(MODEL, [api.base_url for api in system.apis], js, await _references(system, js), ledger)
            await _chaos_and_steady(config, system, workload, report)
            await _serves_normally(system, workload)
        ledger.check_keys(accepted_attempts(system.worker_logs()))
    except NotReady as exc:
        ledger.problem("system", str(exc))
    finally:
        await asyncio.to_thread(system.stop)
    report.summary, report.problems = ledger.summary(), ledger.problems
    report.seconds = time.monotonic() - started
    log.info("chaos.done", ok=report.ok, **report.summary)
    return report


async def _references(system: ChaosSystem, js: JetStreamContext) -> References:
    """The undisturbed greedy answers (nothing is failing yet), each chat answer taken twice (once through each
    api) to be sure they are stable. All asked at once: the workers run them side by side (the sim's tokens are a
    function of the sequence alone), in the time of the longest instead of the sum."""
    refs = References()
    async with httpx.AsyncClient(timeout=60) as http:

        async def chat(index: int, base_url: str) -> str:
            response = await http.post(f"{base_url}/v1/chat/completions", json=chat_body(MODEL, index))
            response.raise_for_status()
            return response.json()["choices"][0]["message"]["content"]

        answers = await asyncio.gather(
            *(asyncio.gather(*(chat(index, api.base_url) for api in system.apis)) for index in range(len(PROMPTS)))
        )
    for index, texts in enumerate(map(set, answers)):
        if len(texts) != 1:
            raise RuntimeError(f"undisturbed runs of prompt {index} differ: {texts}")
        refs.chat.append(texts.pop())
    probe = Workload(MODEL, [], js, refs, Ledger(0))

    async def direct(index: int) -> tuple[str | None, str | None]:
        request_id = f"chaosref{index}{int(time.time() * 1000)}"
        request = direct_request(MODEL, index, request_id, subjects.results_subject("chaosref", request_id))
        return await probe.direct_answer(f"reference {index}", request, time.monotonic())

    for index, (text, finish) in enumerate(await asyncio.gather(*map(direct, range(len(DIRECT_PROMPT_LENGTHS))))):
        if text is None or finish != "length":
            raise RuntimeError(f"undisturbed direct publish {index} failed: {probe.ledger.problems}")
        refs.direct.append(text)
    return refs


async def _chaos_and_steady(config: ChaosConfig, system: ChaosSystem, workload: Workload, report: ChaosReport) -> None:
    stop = asyncio.Event()
    clients = [
        *(workload.streaming_client(f"stream{i}", stop) for i in range(config.streaming_clients)),
        *(workload.keyed_client(f"keyed{i}", stop) for i in range(config.keyed_clients)),
        *(workload.direct_client(f"direct{i}", stop) for i in range(config.direct_clients)),
        workload.batch_client("batch", stop, config.batch_lines),
    ]
    tasks = [asyncio.create_task(client) for client in clients]
    try:
        for fault in fault_schedule(config.seed, config.minutes * 60, system.targets):
            await asyncio.sleep(fault.gap_s)
            log.info("chaos.fault", seed=config.seed, fault=str(fault))
            report.faults.append(str(fault))
            await system.inflict(fault)
        # The steady phase: the same workload, nothing failing. RSS after a warm-up and at its end.
        await asyncio.sleep(min(10.0, config.steady_s / 3))
        before = {name: (rss, pid) for name, rss, pid in _rss(system)}
        await asyncio.sleep(config.steady_s)
        for name, rss, pid in _rss(system):
            report.rss[name] = (before[name][0], rss)
            start, bound = before[name][0], max(before[name][0] * RSS_GROWTH_BOUND[0], RSS_GROWTH_BOUND[1])
            if pid != before[name][1]:
                workload.ledger.problem(name, "restarted during the steady phase (nothing was killed)")
            elif rss - start > bound:
                workload.ledger.problem(
                    name,
                    f"RSS not flat over {config.steady_s:.0f} s without faults: "
                    f"{start / 2**20:.0f} → {rss / 2**20:.0f} MiB",
                )
    finally:
        stop.set()
        done, pending = await asyncio.wait(tasks, timeout=BATCH_DEADLINE_S + REQUEST_DEADLINE_S)
        for task in pending:
            task.cancel()
        if pending:
            workload.ledger.problem("clients", f"{len(pending)} client(s) still waiting long after the run ended")
        for task in done:
            if task.exception() is not None:
                workload.ledger.problem("clients", f"a client crashed: {task.exception()!r}")


def _rss(system: ChaosSystem) -> list[tuple[str, int, int | None]]:
    return [(process.name, process.rss(), process.pid) for process in system.services]


async def _serves_normally(system: ChaosSystem, workload: Workload) -> None:
    """After the chaos: each replica answers a plain request right away, with the undisturbed text."""
    async with httpx.AsyncClient(timeout=30) as http:
        for api in system.apis:
            try:
                response = await http.post(f"{api.base_url}/v1/chat/completions", json=chat_body(MODEL, 1))
            except httpx.TransportError as exc:
                workload.ledger.problem(api.name, f"does not serve after the run: {exc!r}")
                continue
            text = (
                response.json().get("choices", [{}])[0].get("message", {}).get("content")
                if response.status_code == 200
                else None
            )
            if text != workload.refs.chat[1]:
                workload.ledger.problem(api.name, f"after the run: {response.status_code} {response.text[:300]}")
