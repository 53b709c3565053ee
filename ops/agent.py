"""`inferq agent`: a node agent. It joins the agents' queue group for deploy commands (each command reaches exactly
one agent), and for each deployment it takes: starts `inferq worker` here or over SSH (ops/deploy_launch.py,
ops/ssh_launch.py), publishes the worker's output lines, moves the record queued → starting → active once the
worker is in the registry AND has answered a probe generation, and to failed (with the reason) when the worker
exits or does not come up, or stopped on a stop command. The worker dies with the agent (process group + parent
death signal locally, the pty's hang-up over SSH). An agent that crashed and is started again on the same data dir
has the same id (ops/agent_identity.py): it finds the deployments it held still starting or active in KV and starts
their workers again (an SSH deployment fails instead: its credentials were never stored)."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable
from typing import Any, TypeVar

import nats.errors
import structlog
from nats.aio.client import Client as NatsClient
from nats.aio.msg import Msg
from pydantic import ValidationError

from broker.connection import NatsAuth, connect
from broker.deployments import DeploymentBus, DeploymentStore
from broker.errors import BrokerError
from broker.registry import WorkerRegistry
from broker.work_queue import publish_request
from common.settings import Settings
from common.tasks import cancel_and_wait
from contracts import Accepted, End, Failed, GenerateRequest, SamplingParams, WorkerInfo, parse_event
from contracts.deployments import (
    AgentReply,
    DeployCommand,
    Deployment,
    DeploymentStatus,
    InvalidDeploymentTransition,
    LogLine,
)
from ops.agent_identity import claim_identity
from ops.deploy_launch import LaunchFailed, LocalWorker, WorkerLaunch, model_problem

log = structlog.get_logger(__name__)
T = TypeVar("T")

_REGISTRY_POLL_S = 0.5
_TAIL_LINES = 40
_PROBE_ATTEMPT_S = 10.0


class DeploymentFailed(Exception):
    """Ends a supervision with the deployment `failed`; the message is the reason."""


class StoppedElsewhere(Exception):
    """The record left our hands (stopped by the edge while we were not answering): just end the worker."""


class Supervision:
    """One deployment on this agent, from the deploy command until its worker is gone."""

    def __init__(self, agent: Agent, command: DeployCommand, *, restored: bool = False):
        self.agent = agent
        self.command = command
        self.restored = restored  # taken over from this agent's previous life: its worker died with it
        self.deployment_id = command.deployment_id
        self.launch: WorkerLaunch = agent.make_launch(command)
        self.task: asyncio.Task[None] | None = None
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._pump: asyncio.Task[None] | None = None
        self._stop_reason: str | None = None  # set by a stop: the end is `stopped`, not `failed`
        self._subscriptions: list[Any] = []
        self._stopping: asyncio.Task[None] | None = None

    async def listen(self) -> None:
        bus = self.agent.bus
        self._subscriptions = [
            await bus.serve_stop(self.deployment_id, self._on_stop),
            await bus.serve_stats(self.deployment_id, self._on_stats),
        ]

    async def run(self) -> None:
        outcome: tuple[DeploymentStatus, str | None] = (DeploymentStatus.STOPPED, None)
        try:
            await self._bring_up()
            code = await self._exited
            await self._drain_output()
            outcome = (DeploymentStatus.FAILED, self.launch.explain_exit(code, self._tail))
        except DeploymentFailed as exc:
            outcome = (DeploymentStatus.FAILED, str(exc))
        except StoppedElsewhere:
            outcome = (DeploymentStatus.STOPPED, None)
        except asyncio.CancelledError:
            outcome = (DeploymentStatus.STOPPED, self._stop_reason)
        except Exception as exc:  # a bug or NATS gone: still end the worker and say what happened
            log.exception("deployment.supervision_failed", deployment_id=self.deployment_id)
            outcome = (DeploymentStatus.FAILED, f"the agent failed: {type(exc).__name__}: {exc}")
        finally:
            await asyncio.shield(self._finish(*outcome))

    async def _bring_up(self) -> None:
        if self.command.ssh is None and (problem := model_problem(self.command.model_id)):
            raise DeploymentFailed(f"invalid model {self.command.model_id!r}: {problem}")
        if self.restored:
            await self._note("the agent restarted: starting the worker again")
        await self._note(f"starting: {self.launch.command}")
        try:
            await self.launch.start()
        except LaunchFailed as exc:
            raise DeploymentFailed(str(exc)) from None
        finally:
            self.command = self.command.model_copy(update={"ssh": None})  # SSH secrets are used once: drop them
        self._exited = asyncio.ensure_future(self.launch.wait())
        self._pump = asyncio.create_task(self._publish_output())
        await self._update(
            DeploymentStatus.STARTING,
            host=self.launch.host,
            pid=self.launch.pid,
            started_at=time.time(),
            worker_id=None,  # a restored deployment's previous worker is gone
        )
        settings = self.agent.settings
        worker = await self._unless_exited(self._registered(), settings.deploy_start_timeout_s, "did not register")
        await self._update(None, worker_id=worker.worker_id, served_model=worker.model)
        await self._note(f"worker {worker.worker_id} registered for model {worker.model!r}; probing")
        await self._unless_exited(
            self._probe(worker), settings.deploy_probe_timeout_s, "did not answer a probe generation"
        )
        await self._update(DeploymentStatus.ACTIVE)
        await self._note("active")

    async def _unless_exited(self, work: Awaitable[T], timeout_s: float, what: str) -> T:
        """`work`'s result, unless the worker exits first or it takes longer than `timeout_s`."""
        task = asyncio.ensure_future(work)
        try:
            done, _ = await asyncio.wait({task, self._exited}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            if not task.done():
                task.cancel()
        if task in done:
            return task.result()
        if self._exited in done:
            await self._drain_output()
            raise DeploymentFailed(self.launch.explain_exit(self._exited.result(), self._tail))
        raise DeploymentFailed(f"the worker {what} within {timeout_s:g} s")

    async def _registered(self) -> WorkerInfo:
        while True:
            for worker in await self.agent.registry.live_workers():
                if worker.pid == self.launch.pid and worker.host == self.launch.host:
                    return worker
            await asyncio.sleep(_REGISTRY_POLL_S)

    async def _probe(self, worker: WorkerInfo) -> None:
        """A one-token generation on the worker's model, repeated until our worker is the one that answers (the
        model's queue is shared with any other worker of it)."""
        while True:
            try:
                answered_by = await self.agent.probe(worker.model)
            except (BrokerError, nats.errors.TimeoutError) as exc:  # busy or not yet subscribed: ask again
                log.info("deployment.probe_unanswered", deployment_id=self.deployment_id, error=str(exc))
                await asyncio.sleep(_REGISTRY_POLL_S)
                continue
            if answered_by == worker.worker_id:
                return
            log.info(
                "deployment.probe_taken_by_another_worker", deployment_id=self.deployment_id, worker_id=answered_by
            )

    async def _publish_output(self) -> None:
        async for line in self.launch.lines():
            self._tail.append(line)
            await self._publish(LogLine(timestamp=time.time(), content=line))

    async def _drain_output(self) -> None:
        """Let the output reader reach the end, so a failure reason sees the worker's last words."""
        if self._pump is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._pump), 5.0)
            except TimeoutError:
                pass

    async def _note(self, text: str, *, final: bool = False) -> None:
        await self._publish(LogLine(timestamp=time.time(), content=f"[agent] {text}", source="agent", final=final))

    async def _publish(self, line: LogLine) -> None:
        try:
            await self.agent.bus.publish_log(self.deployment_id, line)
        except BrokerError as exc:
            log.warning("deployment.log_publish_failed", deployment_id=self.deployment_id, error=str(exc))

    async def _update(self, status: DeploymentStatus | None, **changes: Any) -> Deployment:
        now = time.time()

        def edit(current: Deployment) -> Deployment:
            if status is None:
                if current.status.terminal:
                    raise StoppedElsewhere
                return current.model_copy(update={**changes, "updated_at": now})
            return current.transition(status, now, **changes)

        try:
            stored = await self.agent.store.change(self.deployment_id, edit)
        except InvalidDeploymentTransition:
            raise StoppedElsewhere from None
        if stored is None:
            raise StoppedElsewhere
        log.info("deployment.updated", deployment_id=self.deployment_id, status=stored.record.status)
        return stored.record

    async def _finish(self, status: DeploymentStatus, reason: str | None) -> None:
        for subscription in self._subscriptions:
            await subscription.unsubscribe()
        await self.launch.stop()
        await self._drain_output()
        if self._pump is not None:
            self._pump.cancel()
        try:
            await self._update(status, error=reason)
        except StoppedElsewhere:
            pass
        except Exception as exc:  # the record cannot be written (NATS gone): the worker is stopped regardless
            log.warning("deployment.final_update_failed", deployment_id=self.deployment_id, error=str(exc))
        ending = f"{status}: {reason}" if reason else str(status)
        await self._note(ending, final=True)
        log.info("deployment.ended", deployment_id=self.deployment_id, status=status, reason=reason)
        self.agent.forget(self.deployment_id)

    # --- requests from the edge ---

    async def stop(self, reason: str | None = None) -> None:
        self._stop_reason = reason
        if self.task is not None and not self.task.done():
            await cancel_and_wait(self.task)

    async def _on_stop(self, msg: Msg) -> None:
        # In a task of its own: ending the deployment unsubscribes this very subscription, which cancels the
        # callback that is running (nats-py), and the answer would never go out.
        self._stopping = asyncio.create_task(self._stop_and_answer(msg))

    async def _stop_and_answer(self, msg: Msg) -> None:
        await self.stop()
        await msg.respond(AgentReply(agent_id=self.agent.agent_id).to_bytes())

    async def _on_stats(self, msg: Msg) -> None:
        await msg.respond((await self.launch.stats()).to_bytes())


class Agent:
    def __init__(
        self,
        nc: NatsClient,
        settings: Settings,
        store: DeploymentStore,
        registry: WorkerRegistry,
        agent_id: str | None = None,
    ):
        self.nc = nc
        self.settings = settings
        self.store = store
        self.registry = registry
        self.bus = DeploymentBus(nc)
        self.agent_id = agent_id or f"a{uuid.uuid4().hex[:12]}"
        self.host = socket.gethostname()
        self._supervisions: dict[str, Supervision] = {}
        self._subscription: Any = None

    @classmethod
    async def open(cls, nc: NatsClient, settings: Settings, agent_id: str | None = None) -> Agent:
        js = nc.jetstream()
        store = await DeploymentStore.open(js, settings.deploy_log_history, settings.nats_replicas)
        registry = await WorkerRegistry.open(js, settings.registry_ttl_s, settings.nats_replicas)
        return cls(nc, settings, store, registry, agent_id)

    async def start(self) -> None:
        await self._restore()
        self._subscription = await self.bus.serve_starts(self._on_deploy)
        await self.nc.flush()
        log.info("agent.ready", agent_id=self.agent_id, host=self.host)

    async def _restore(self) -> None:
        """Deployments this agent id still holds (its previous process died without ending them): start their
        workers again, from the record."""
        for deployment in await self.store.list():
            if deployment.agent_id != self.agent_id or deployment.status.terminal:
                continue
            if deployment.ssh_host is not None:
                await self._fail_unrestorable(deployment)
                continue
            log.warning("agent.restoring_deployment", deployment_id=deployment.id, status=deployment.status)
            command = DeployCommand(deployment_id=deployment.id, model_id=deployment.model_id)
            await self._supervise(command, restored=True)

    async def _fail_unrestorable(self, deployment: Deployment) -> None:
        reason = "the agent restarted, and an SSH deployment cannot be started again (its credentials are never stored)"
        now = time.time()

        def fail(current: Deployment) -> Deployment | None:
            if current.status.terminal:
                return None
            return current.transition(DeploymentStatus.FAILED, now, error=reason)

        await self.store.change(deployment.id, fail)
        log.warning("agent.deployment_not_restorable", deployment_id=deployment.id, reason=reason)

    async def stop(self) -> None:
        """Stop taking deployments, then end every worker this agent runs (they would die with it anyway)."""
        if self._subscription is not None:
            await self._subscription.unsubscribe()
            self._subscription = None
        reason = f"the agent on {self.host} shut down"
        await asyncio.gather(*(supervision.stop(reason) for supervision in list(self._supervisions.values())))

    def make_launch(self, command: DeployCommand) -> WorkerLaunch:
        if command.ssh is None:
            return LocalWorker(self.settings, command.model_id)
        from ops.ssh_launch import SshWorker  # asyncssh only where SSH is used

        return SshWorker(self.settings, command.model_id, command.ssh)

    def forget(self, deployment_id: str) -> None:
        self._supervisions.pop(deployment_id, None)

    async def _on_deploy(self, msg: Msg) -> None:
        try:
            command = DeployCommand.from_bytes(msg.data)
        except ValidationError:
            log.warning("agent.invalid_command")  # never the payload: it may hold a password
            await msg.respond(AgentReply(agent_id=self.agent_id, ok=False, error="invalid deploy command").to_bytes())
            return
        reply = await self._take(command)
        await msg.respond(reply.to_bytes())

    async def _take(self, command: DeployCommand) -> AgentReply:
        """Claim the record, listen for stop/stats, then answer; the worker starts after the answer."""

        def claim(current: Deployment) -> Deployment:
            if current.status is not DeploymentStatus.QUEUED or current.agent_id is not None:
                raise InvalidDeploymentTransition(f"deployment {current.id} is {current.status}")
            return current.model_copy(update={"agent_id": self.agent_id, "updated_at": time.time()})

        try:
            claimed = await self.store.change(command.deployment_id, claim)
        except InvalidDeploymentTransition as exc:
            return AgentReply(agent_id=self.agent_id, ok=False, error=str(exc))
        if claimed is None:
            return AgentReply(agent_id=self.agent_id, ok=False, error=f"no deployment {command.deployment_id}")
        await self._supervise(command)
        log.info(
            "agent.took_deployment",
            deployment_id=command.deployment_id,
            model=command.model_id,
            ssh_host=command.ssh.host if command.ssh else None,
        )
        return AgentReply(agent_id=self.agent_id)

    async def _supervise(self, command: DeployCommand, restored: bool = False) -> None:
        """Listen for stop/stats, then run the deployment in a task of its own."""
        supervision = Supervision(self, command, restored=restored)
        await supervision.listen()
        self._supervisions[command.deployment_id] = supervision
        supervision.task = asyncio.create_task(supervision.run(), name=f"deployment-{command.deployment_id}")

    async def probe(self, model: str) -> str:
        """Send a one-token generation to `model`'s queue; the id of the worker that answered it. Raises
        DeploymentFailed when the worker answers with an error."""
        request_id = f"probe-{uuid.uuid4().hex[:16]}"
        inbox = self.nc.new_inbox()
        subscription = await self.nc.subscribe(inbox)
        try:
            request = GenerateRequest(
                request_id=request_id,
                model=model,
                prompt_token_ids=[1],
                sampling=SamplingParams(max_tokens=1, temperature=0.0),
                reply_subject=inbox,
                deadline=time.time() + _PROBE_ATTEMPT_S,
            )
            await publish_request(self.nc.jetstream(), request)
            answered_by = ""
            while True:
                msg = await subscription.next_msg(timeout=_PROBE_ATTEMPT_S)
                event = parse_event(msg.data)
                if isinstance(event, Accepted):
                    answered_by = event.worker_id
                elif isinstance(event, End):
                    return answered_by
                elif isinstance(event, Failed):
                    raise DeploymentFailed(f"the probe generation failed: {event.error.message}")
        finally:
            await subscription.unsubscribe()


async def serve_agent(settings: Settings, stop: asyncio.Event) -> None:
    if not settings.nats_url:
        raise SystemExit("inferq agent needs a NATS server: set INFERQ_NATS_URL or pass --nats")
    identity = claim_identity(settings.data_dir)  # the same id as before a crash: its deployments come back
    try:
        async with connect(settings.nats_url, name="inferq-agent", auth=NatsAuth.from_settings(settings)) as nc:
            agent = await Agent.open(nc, settings, identity.agent_id)
            await agent.start()
            try:
                await stop.wait()
            finally:
                await agent.stop()
    finally:
        identity.release()


def run_agent(settings: Settings) -> None:
    # asyncssh logs every channel at info (a log stream asks for process statistics every few seconds).
    logging.getLogger("asyncssh").setLevel(max(logging.WARNING, logging.getLogger().level))

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await serve_agent(settings, stop)

    asyncio.run(main())
