"""`keel chaos`: many runs of an agent with side effects, while their workers are SIGKILLed,
the Temporal server is restarted and the model fails; then every run is checked against the
ledger it changed and the model's record of what it was asked.

On the embedded default it starts everything itself, in a temporary directory: a Temporal
dev server on a SQLite file (so it can be killed and started again on the same data), the
scripted model with faults at a rate (429 with Retry-After, 500, replies too slow for the
client's timeout, bodies that are not JSON), and worker processes (`keel worker`) serving
the chaos agent (`keel.chaos.agent`). With `--address` (or TEMPORAL_ADDRESS) the runs
go to that deployment instead, on a task queue of their own, served by worker processes it
starts here; it cannot restart that server. The checks are in `keel.chaos.check`.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import random
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Awaitable
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import (
    DescribeTaskQueueRequest,
)
from temporalio.client import Client, WorkflowExecutionStatus, WorkflowUpdateFailedError
from temporalio.exceptions import WorkflowAlreadyStartedError
from temporalio.runtime import LoggingConfig, Runtime, TelemetryConfig, TelemetryFilter
from temporalio.service import RPCError

from keel.chaos.agent import (
    AGENT_NAME,
    MAX_THINK_SECONDS,
    ChaosLedger,
    chaos_rules,
    first_message,
    request_run,
)
from keel.chaos.check import (
    Disruption,
    LedgerRow,
    ModelCall,
    Observed,
    RunOutcome,
    SentDecision,
    SentMessage,
    ToolAttempt,
    check,
    conversation_key,
    outcome_of,
    recovery,
    report_lines,
    spurious_retries,
    summary_line,
    waits,
)
from keel.chaos.stack import (
    SERVER_START_TIMEOUT,
    DevServer,
    WorkerPool,
    fault_specs,
    free_port,
    identity,
    malformed_signal,
    retrying,
    runs_on_worker,
)
from keel.client.api import AgentClient, KeelClientError
from keel.config import Settings, connect
from keel.dev import DevStackError
from keel.testing.model_server import RuleSet, ScriptedModelServer
from keel.workflows.models import (
    PENDING_APPROVALS,
    DecideInput,
    Decision,
    MessagePolicy,
    RunState,
)

STEP_SECONDS = 1.2  # what a step costs besides the model's think time (tool, workflow tasks)
POLL_SECONDS = 0.5
RPC_TIMEOUT = timedelta(seconds=10)


class ChaosError(KeelClientError):
    """An option or a setup that cannot work; the message says which."""


@dataclass(frozen=True)
class ChaosOptions:
    """What `keel chaos` does; the defaults make a run of a minute or two."""

    runs: int = 20
    workers: int = 3
    kill_every: float = 8.0  # mean seconds between worker kills (0: none)
    fault_rate: float = 0.1  # share of model requests that fail
    seed: int = 1
    duration: float = 60.0  # seconds of chaos (runs start in its first half)
    deadline: float = 120.0  # then at most this long for the runs to finish
    server_restart: bool = True
    address: str | None = None  # an existing deployment (default: the embedded one)
    keep: bool = False  # leave the temporary directory for inspection

    def validate(self) -> None:
        """Raise ChaosError naming the first option that cannot work."""
        checks = [
            (self.runs >= 1, "--runs must be at least 1"),
            (self.workers >= 1, "--workers must be at least 1"),
            (self.kill_every >= 0, "--kill-every must be 0 (no kills) or more seconds"),
            (0 <= self.fault_rate < 1, "--fault-rate must be at least 0 and below 1"),
            (self.duration > 0, "--duration must be more than 0 seconds"),
            (self.deadline > 0, "--deadline must be more than 0 seconds"),
        ]
        for ok, message in checks:
            if not ok:
                raise ChaosError(message)
        if self.address is not None:
            host, _, port = self.address.rpartition(":")
            if not host or not port.isdigit():
                raise ChaosError(f"--address must be host:port, got {self.address!r}")


@dataclass
class RunPlan:
    """One run, and what will happen to it (drawn up front from the seed)."""

    index: int
    run_id: str
    of: int
    amount: float
    start_in: float  # seconds into the chaos
    messages: list[tuple[float, MessagePolicy, bool]]  # when, policy, sent twice (same id)
    malformed: list[tuple[float, int]]  # when, which malformed signal
    rng: random.Random  # its decisions
    started_at: float | None = None


def think_seconds(duration: float) -> float:
    """How long each scripted model reply takes: long enough that kills find model calls in
    flight, short enough that runs make several steps in the chaos window."""
    return min(max(duration / 12, 0.5), MAX_THINK_SECONDS)


def plan_runs(opts: ChaosOptions, tag: str) -> list[RunPlan]:
    """Every run's size, approvals, messages and malformed signals, from the seed. All runs
    start in the first seconds and are sized to last through much of the chaos."""
    rng = random.Random(opts.seed)
    step = think_seconds(opts.duration) + STEP_SECONDS
    most = max(4, min(50, round(0.7 * opts.duration / step)))
    plans = []
    for i in range(opts.runs):
        of = rng.randint(3, most)
        life = 0.8 * (of + 1) * step  # when messages and signals may come
        messages: list[tuple[float, MessagePolicy, bool]] = []
        if rng.random() < 0.5:
            messages.append((rng.uniform(0.3, life), MessagePolicy.QUEUE, rng.random() < 0.3))
        if rng.random() < 0.3:
            messages.append((rng.uniform(0.3, life), MessagePolicy.INTERRUPT, False))
        malformed = [(rng.uniform(0.2, life), rng.randrange(7)) for _ in range(rng.randint(0, 2))]
        plans.append(
            RunPlan(
                index=i,
                run_id=f"chaos-{tag}-{i:03d}",
                of=of,
                amount=75.0 if i % 3 == 1 else float(rng.choice([5, 10, 20, 30])),
                start_in=rng.uniform(0, min(5.0, opts.duration / 10)),
                messages=sorted(messages, key=lambda m: m[0]),
                malformed=sorted(malformed),
                rng=random.Random(opts.seed * 1_000_003 + i),
            )
        )
    return plans


class Chaos:
    """One `keel chaos` session: set up, strike, wait, check, report."""

    def __init__(self, opts: ChaosOptions, settings: Settings) -> None:
        self.opts = opts
        self.base = settings
        self.tag = uuid.uuid4().hex[:6]
        self.task_queue = f"keel-chaos-{self.tag}"
        self.home = Path(tempfile.mkdtemp(prefix="keel-chaos-"))
        self.plans = plan_runs(opts, self.tag)
        self.seen = Observed()
        self.server: DevServer | None = None
        self.models: list[ScriptedModelServer] = []  # one per worker slot: who asked what
        self.workers: WorkerPool | None = None
        self.client: Client | None = None
        self.agents: AgentClient | None = None
        self.t0 = time.time()
        self._decided: set[str] = set()
        self._approving: set[str] = set()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._keep = opts.keep  # and when setting up fails: its logs say why

    def say(self, text: str, *, timed: bool = True) -> None:
        """A progress line; during the chaos, with the time since it began."""
        when = f"[{time.time() - self.t0:6.1f}s]" if timed else " " * 9
        print(f"{when} {text}", flush=True)

    @property
    def embedded(self) -> bool:
        return self.opts.address is None

    # --- setting up ------------------------------------------------------------------------

    async def setup(self) -> None:
        o = self.opts
        if self.embedded:
            self.server = DevServer(self.home, free_port())
            await self.server.start()
            self.client = await connect(self._settings())
            self.say(
                f"Temporal dev server at {self.server.address}, data in {self.home}", timed=False
            )
        else:
            try:
                self.client = await asyncio.wait_for(connect(self._settings()), 15)
            except (RuntimeError, TimeoutError) as e:
                raise ChaosError(f"cannot reach Temporal at {o.address}: {e}") from e
            self.say(
                f"Temporal at {o.address} (an existing deployment: its server is not "
                f"restarted), task queue {self.task_queue}",
                timed=False,
            )
        self.agents = AgentClient(self.client, self._settings())
        think = think_seconds(o.duration)
        rules = RuleSet.from_dict(chaos_rules(think))
        for i in range(o.workers):
            self.models.append(ScriptedModelServer(rules))
            self.models[i].start()
            self.models[i].set_faults(fault_specs(o.fault_rate, o.seed * 100 + i))
        self.say(
            f"scripted model at {', '.join(m.url for m in self.models)} (one per worker): "
            f"replies take {think:.1f}s, {o.fault_rate:.0%} of requests fail",
            timed=False,
        )
        self.workers = WorkerPool(o.workers, self._worker_env, self.home)
        for i in range(o.workers):
            await self.workers.start(i)
        await self._wait_for_pollers(o.workers)
        self.say(f"{o.workers} worker processes serving the chaos agent", timed=False)

    def _settings(self) -> Settings:
        if self.embedded:
            assert self.server is not None
            return Settings(address=self.server.address, task_queue=self.task_queue)
        return dataclasses.replace(self.base, address=self.opts.address, task_queue=self.task_queue)

    def _worker_env(self, i: int) -> dict[str, str]:
        """Worker `i`'s environment: the chaos agent's model (its own), ledger and task queue.
        Against a deployment they keep the rest (TLS, API key, payload storage, encryption),
        so they read and write payloads as this client does; on the embedded default, nothing
        of the caller's Temporal or Keel settings leaks in."""
        drop = ("OPENAI_", "KEEL_", "TEMPORAL_") if self.embedded else ("OPENAI_",)
        env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
        env.update(
            TEMPORAL_ADDRESS=self._settings().address,
            KEEL_TASK_QUEUE=self.task_queue,
            KEEL_MODEL_PORT=str(self.models[i].port),
            KEEL_CHAOS_LEDGER=str(self.home / "ledger.db"),
            KEEL_HOME=str(self.home),
        )
        if self.embedded:
            env["TEMPORAL_NAMESPACE"] = "default"
        return env

    async def _wait_for_pollers(self, n: int) -> None:
        assert self.client is not None and self.workers is not None
        deadline = time.time() + SERVER_START_TIMEOUT
        while time.time() < deadline:
            with contextlib.suppress(RPCError):
                resp = await self.client.workflow_service.describe_task_queue(
                    DescribeTaskQueueRequest(
                        namespace=self.client.namespace,
                        task_queue=TaskQueue(name=self.task_queue),
                        task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
                    )
                )
                if len({p.identity for p in resp.pollers}) >= n:
                    return
            if not self.workers.alive():
                why = self.workers.last_words(0)
                raise ChaosError(f"the workers exited at start ({why}); logs in {self.home}")
            await asyncio.sleep(0.3)
        raise ChaosError(f"the workers did not start polling within 60 s; logs in {self.home}")

    # --- the chaos -------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[Any]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # the harness's own failure: said, so that it is not mistaken for Keel's
            self.seen.notes.append(f"harness task failed: {task.exception()!r}")

    async def strike(self) -> None:
        """Start the runs and do the damage for `duration` seconds, then wait for the runs."""
        o = self.opts
        self.t0 = time.time()
        for plan in self.plans:
            self._spawn(self._drive(plan))
        self._spawn(self._observe())
        self._spawn(self._watch_workers())
        strikes = [asyncio.ensure_future(self._kill_workers())]
        if self.embedded and o.server_restart:
            strikes.append(asyncio.ensure_future(self._restart_server()))
        await asyncio.sleep(o.duration)
        await asyncio.gather(*strikes)
        left = [p.run_id for p in self.plans if p.run_id not in self.seen.closed]
        self.say(f"chaos over; waiting up to {o.deadline:.0f}s for {len(left)} runs to finish")
        until = time.time() + o.deadline
        while time.time() < until and len(self.seen.closed) < len(self.plans):
            await asyncio.sleep(POLL_SECONDS)

    async def _drive(self, plan: RunPlan) -> None:
        """Start one run, then send it its messages and malformed signals on time."""
        assert self.agents is not None
        await asyncio.sleep(plan.start_in)
        text = first_message(plan.run_id, plan.of, plan.amount)
        until = self.t0 + self.opts.duration + self.opts.deadline
        timeout = timedelta(seconds=self.opts.duration + self.opts.deadline + 300)

        async def start() -> str:
            assert self.agents is not None
            try:
                return await self.agents.start(
                    AGENT_NAME, text, user="chaos", run_id=plan.run_id, execution_timeout=timeout
                )
            except WorkflowAlreadyStartedError:
                return plan.run_id  # a retry after an answer lost in a server restart

        await retrying(start, until)
        plan.started_at = time.time()
        events: list[tuple[float, str, Any]] = [(t, "message", m) for t, *m in plan.messages]
        events += [(t, "malformed", k) for t, k in plan.malformed]
        for n, (t, kind, item) in enumerate(sorted(events, key=lambda e: e[0])):
            await asyncio.sleep(max(0.0, plan.started_at + t - time.time()))
            if plan.run_id in self.seen.closed:
                return
            if kind == "message":
                await self._message(plan, n, *item)
            else:
                await self._malformed(plan, item)

    async def _message(self, plan: RunPlan, n: int, policy: MessagePolicy, twice: bool) -> None:
        assert self.agents is not None
        sender = f"chaos-user-{plan.index}-{n}"
        text = f"chaos {policy.value} message {n} for {plan.run_id}: please carry on"
        message_id = uuid.uuid4().hex
        for _ in range(2 if twice else 1):
            try:
                receipt = await self.agents.send_message(
                    plan.run_id, text, policy, sender=sender, message_id=message_id
                )
                status = receipt.status
            except (KeelClientError, RPCError, RuntimeError):
                status = "unknown"
            self.seen.messages.append(SentMessage(plan.run_id, text, sender, status))

    async def _malformed(self, plan: RunPlan, which: int) -> None:
        assert self.client is not None
        name, args = malformed_signal(which)
        try:
            await self.client.get_workflow_handle(plan.run_id).signal(name, args=args)
        except (RPCError, RuntimeError):
            return  # not sent (the run ended, the server is down): nothing to check
        self.seen.malformed[plan.run_id] += 1

    async def _observe(self) -> None:
        """Follow every run through visibility; decide the approvals runs ask for."""
        assert self.client is not None
        while True:
            try:
                async for wf in self.client.list_workflows(f"TaskQueue = '{self.task_queue}'"):
                    if wf.status == WorkflowExecutionStatus.CONTINUED_AS_NEW:
                        continue
                    pending = wf.typed_search_attributes.get(PENDING_APPROVALS)
                    self.seen.pending[wf.id] = pending or 0
                    if wf.status != WorkflowExecutionStatus.RUNNING and wf.close_time:
                        self.seen.closed.setdefault(wf.id, wf.close_time.timestamp())
            except (RPCError, RuntimeError):
                pass  # the server is restarting
            for run_id, n in self.seen.pending.items():
                if n and run_id not in self.seen.closed and run_id not in self._approving:
                    self._approving.add(run_id)
                    self._spawn(self._approve(run_id))
            await asyncio.sleep(POLL_SECONDS)

    async def _approve(self, run_id: str) -> None:
        """Decide what the run waits for: approve, edit or reject, by update or by signal."""
        assert self.agents is not None
        plan = next(p for p in self.plans if p.run_id == run_id)
        try:
            state = await self.agents.get_state(run_id, timeout=RPC_TIMEOUT)
            for r in state.pending_approvals:
                if r.call_id in self._decided:
                    continue
                await asyncio.sleep(plan.rng.uniform(0, 1.0))
                await self._decide(plan, r.call_id)
        except (KeelClientError, RPCError, RuntimeError):
            pass  # asked again at the next look
        finally:
            self._approving.discard(run_id)

    async def _decide(self, plan: RunPlan, call_id: str) -> None:
        assert self.agents is not None
        roll = plan.rng.random()
        by_signal = plan.rng.random() < 0.2
        approver = f"chaos-approver-{plan.index}"
        if roll < 0.04:
            d = DecideInput(
                call_id=call_id, decision=Decision.REJECT, approver=approver, reason="chaos says no"
            )
            outcome = "rejected"
        elif roll < 0.3:
            d = DecideInput(
                call_id=call_id, decision=Decision.EDIT, approver=approver, arguments={"amount": 40}
            )
            outcome = "edited"
        else:
            d = DecideInput(call_id=call_id, decision=Decision.APPROVE, approver=approver)
            outcome = "approved"
        accepted: bool | None
        sent = time.time()
        try:
            receipt = await self.agents.decide(plan.run_id, d, wait=not by_signal)
            accepted = None if receipt.note else receipt.accepted
        except KeelClientError as e:
            if not isinstance(e.__cause__, WorkflowUpdateFailedError):
                return  # no answer (the server restarting): decided again at the next look
            accepted = False  # refused: the call was withdrawn by an interrupt, say
        self._decided.add(call_id)
        self.seen.decisions.append(
            SentDecision(plan.run_id, call_id, outcome, d.approver, accepted, at=sent)
        )

    async def _kill_workers(self) -> None:
        """SIGKILL a random worker every ~kill_every seconds, and start it again at once."""
        o = self.opts
        if o.kill_every <= 0:
            return
        rng = random.Random(o.seed + 1)
        at = rng.uniform(0.5, 1.5) * o.kill_every
        while at < o.duration:
            await asyncio.sleep(max(0.0, self.t0 + at - time.time()))
            at += rng.uniform(0.5, 1.5) * o.kill_every
            await self._kill_one(rng)

    async def _kill_one(self, rng: random.Random) -> None:
        assert self.workers is not None
        alive = self.workers.alive()
        if not alive:
            return
        i = rng.choice(alive)
        proc = self.workers.procs[i]
        assert proc is not None
        assert self.client is not None
        hit = await runs_on_worker(self.client, self._working(), identity(proc.pid))
        at = time.time()
        await self.workers.restart(i)
        self.seen.disruptions.append(Disruption("kill", at, at, hit, worker=i, pid=proc.pid))
        self.say(f"killed worker {i} (pid {proc.pid}), started another; {len(hit)} runs hit")

    def _working(self) -> list[str]:
        """The runs started, not finished, and not waiting for a person."""
        return [
            p.run_id
            for p in self.plans
            if p.started_at
            and p.run_id not in self.seen.closed
            and not self.seen.pending.get(p.run_id)
        ]

    async def _restart_server(self) -> None:
        """SIGKILL the Temporal server once, mid-way, and start it again on the same file."""
        assert self.server is not None
        rng = random.Random(self.opts.seed + 2)
        await asyncio.sleep(self.opts.duration * rng.uniform(0.4, 0.6))
        hit = self._working()
        at = time.time()
        await self.server.kill()
        await asyncio.sleep(rng.uniform(1.0, 3.0))  # down for a moment, as a real restart is
        await self.server.start()
        until = time.time()
        self.seen.restarts.append(Disruption("server restart", at, until, hit))
        self.say(f"killed the Temporal server, started it again: down {until - at:.1f}s")

    async def _watch_workers(self) -> None:
        """A worker that dies on its own is noted and started again."""
        assert self.workers is not None
        while True:
            await asyncio.sleep(1.0)
            for i, pid, code in self.workers.exited():
                why = self.workers.last_words(i)
                note = f"worker {i} (pid {pid}) exited by itself with code {code}: {why}"
                at = time.time()
                self.seen.exits.append(Disruption("exit", at, at, [], worker=i, pid=pid))
                self.seen.notes.append(note)
                self.say(note + "; started again")
                await self.workers.start(i)

    # --- the checks ------------------------------------------------------------------------

    async def gather(self) -> tuple[list[RunOutcome], list[LedgerRow]]:
        """Every run's record, and the ledger."""
        gate = asyncio.Semaphore(8)
        outcomes = await asyncio.gather(*(self._outcome(p, gate) for p in self.plans))
        ledger = ChaosLedger(self.home / "ledger.db")
        rows = [
            LedgerRow(key=r["idempotency_key"], op=r["op"], run=r["run"], amount=r["amount"])
            for r in ledger.rows("effects")
        ]
        return list(outcomes), rows

    async def _outcome(self, plan: RunPlan, gate: asyncio.Semaphore) -> RunOutcome:
        assert self.agents is not None
        out = RunOutcome(plan.run_id, plan.of)
        async with gate:
            try:
                st = await self._final_state(plan.run_id)
            except KeelClientError as e:
                self.seen.notes.append(f"{plan.run_id}: its record could not be read: {e}")
                return out
        return outcome_of(plan.run_id, plan.of, st)

    async def _final_state(self, run_id: str) -> RunState:
        """The run's whole record; a worker just started, or a busy one, gets a minute."""
        assert self.agents is not None
        until = time.time() + 60
        while True:
            try:
                return await self.agents.get_state(run_id)
            except (KeelClientError, RPCError, RuntimeError) as e:
                if time.time() > until:
                    raise KeelClientError(str(e)) from e
            await asyncio.sleep(1.0)

    def model_record(self) -> tuple[list[ModelCall], dict[str, list[float]], Counter[str]]:
        """The model's requests by run (and the worker that sent each), progress times by
        run, and faults by kind. A run progresses when the model is asked, when its reply has
        gone out whole to a worker that lived through it, and when a tool writes."""
        calls, progress, faults = [], defaultdict(list), Counter[str]()
        struck = self.seen.disruptions + self.seen.restarts + self.seen.exits
        for worker, model in enumerate(self.models):
            for r in model.requests():
                body = r["body"] if isinstance(r["body"], dict) else {}
                run = request_run(body)
                if r["outcome"].startswith("fault:"):
                    faults[r["outcome"][6:]] += 1
                if run is not None:
                    key = conversation_key(body)
                    calls.append(ModelCall(run, key, r["outcome"], r["at"], worker))
                    progress[run].append(r["at"])
                    end = (r.get("chunks_at") or [None])[-1]
                    if (
                        r["outcome"] == "served"
                        and end is not None
                        and not any(
                            d.worker in (None, worker) and r["at"] <= d.at <= end for d in struck
                        )
                    ):
                        progress[run].append(end)
        for a in self.tool_attempts():
            progress[a.run].append(a.at)
        return calls, progress, faults

    def tool_attempts(self) -> list[ToolAttempt]:
        """Every transfer write the ledger logged, with the worker process that made it."""
        rows = ChaosLedger(self.home / "ledger.db").rows("attempts")
        return [ToolAttempt(r["idempotency_key"], r["run"], r["pid"], r["at"]) for r in rows]

    async def report(self) -> int:
        """Check everything, print what was found; the last line is the summary."""
        outcomes, ledger = await self.gather()
        calls, progress, faults = self.model_record()
        s = self.seen
        verdict = check(
            outcomes, ledger, s.messages, s.decisions, dict(s.malformed), calls,
            s.disruptions + s.restarts + s.exits,
        )  # fmt: skip
        kills = recovery(s.disruptions, progress, s.closed, s.restarts, s.decisions)
        restart = recovery(s.restarts, progress, s.closed)
        struck = s.disruptions + s.restarts + s.exits
        spurious = spurious_retries(calls, self.tool_attempts(), struck, self.t0)
        lines = report_lines(verdict, outcomes, ledger, s, faults, kills, restart, spurious)
        every = waits(s.disruptions, progress, s.closed)
        if len(every) > len(kills):
            lines.append(
                f"recovery: {len(every) - len(kills)} waits after a kill left out: the server "
                "restart broke into them, or the run was waiting for a person's decision"
            )
        slow = waits(s.disruptions, progress, s.closed, s.restarts, s.decisions)
        slow.sort(key=lambda w: -w[0])
        for wait, run, d in slow[:3]:
            lines.append(
                f"slowest takeover: {run}, {wait:.1f}s after the kill of worker {d.worker} "
                f"at {d.at - self.t0:.1f}s"
            )
        if not self.embedded:
            lines.append("server restart: not done (an existing deployment cannot be restarted)")
        for line in lines:
            print(f"  {line}", flush=True)
        if self.opts.keep:
            print(f"kept: {self.home}", flush=True)
        restarts = len(s.restarts)
        print(
            summary_line(
                verdict, kills, len(s.disruptions), restarts, sum(faults.values()), len(spurious)
            )
        )
        sys.stdout.flush()
        return 0 if verdict.ok else 1

    # --- tearing down ----------------------------------------------------------------------

    async def teardown(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self.client is not None:  # a deployment keeps no unfinished chaos run
            for p in self.plans:
                if p.started_at and p.run_id not in self.seen.closed:
                    with contextlib.suppress(RPCError, RuntimeError):
                        await self.client.get_workflow_handle(p.run_id).terminate(
                            "keel chaos is over"
                        )
        if self.workers is not None:
            await self.workers.stop()
        for model in self.models:
            model.stop()
        if self.server is not None:
            await self.server.stop()
        if not self._keep:
            shutil.rmtree(self.home, ignore_errors=True)


async def run_chaos(opts: ChaosOptions, settings: Settings) -> int:
    """`keel chaos`: returns 0 when nothing was lost or duplicated, else 1."""
    opts.validate()
    # the SDK's core logs each retried call while the server is down, on stdout: the
    # harness says what it did itself, and its last line must stay the summary
    quiet = TelemetryFilter(core_level="ERROR", other_level="ERROR")
    telemetry = TelemetryConfig(logging=LoggingConfig(filter=quiet))
    Runtime.set_default(Runtime(telemetry=telemetry), error_if_already_set=False)
    chaos = Chaos(opts, settings)
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    if task is not None:  # SIGTERM tears down like Ctrl-C: no orphaned server or workers
        loop.add_signal_handler(signal.SIGTERM, task.cancel)
    where = f"the deployment at {opts.address}" if opts.address else "the embedded default"
    kills = f"a kill every ~{opts.kill_every:g}s" if opts.kill_every else "no kills"
    print(
        f"chaos: {opts.runs} runs on {where}, {opts.workers} worker processes, {kills} for "
        f"{opts.duration:g}s, model faults on {opts.fault_rate:.0%}, seed {opts.seed}",
        flush=True,
    )
    try:
        try:
            await chaos.setup()
        except (KeelClientError, DevStackError):
            chaos._keep = chaos.embedded  # the server's and workers' logs are there
            raise
        await chaos.strike()
        return await chaos.report()
    finally:
        await chaos.teardown()
