"""The measurements. Each one runs every system it concerns round by round, rotating the order
from round to round, so that all of them share the machine's noise."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from google.protobuf.message import Message
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowHandle

from bench.drivers import KeelSystem, LoopRunner, Started, System, TemporalSystem
from bench.harness import Arrivals, ProcError
from bench.procstat import cpu_seconds, rss_bytes
from keel.workflows.models import CALL_MODEL, DecideInput, Decision

MODEL_ACTIVITIES = {
    "keel": CALL_MODEL,
    "keel_local": CALL_MODEL,
    "keel_api": CALL_MODEL,
    "keel_stored": CALL_MODEL,
    "temporal_loop": "bench.call_model",
    "openai_agents": "invoke_model_activity",
    "pydantic_ai": "agent__bench__model_request",
}


def rotated(items: Sequence[Any], r: int) -> list[Any]:
    n = r % len(items) if items else 0
    return list(items[n:]) + list(items[:n])


@dataclass
class Sample:
    """One measured run (or batch of runs): wall time, and CPU seconds spent meanwhile."""

    seconds: float
    worker_cpu: float
    server_cpu: float
    model_cpu: float


@dataclass
class Meter:
    """Wall time and CPU time (from /proc) of the system's worker process, the dev server and
    the fake endpoint, around a piece of work."""

    server_pid: int
    model_pid: int

    async def measure(self, system: System, work: Callable[[], Awaitable[Any]]) -> Sample:
        pids = (system.pid, self.server_pid, self.model_pid)
        before = [cpu_seconds(p) for p in pids]
        t0 = time.perf_counter()
        await work()
        elapsed = time.perf_counter() - t0
        after = [cpu_seconds(p) for p in pids]
        w, s, m = (a - b for a, b in zip(after, before, strict=True))
        return Sample(elapsed, w, s if system.uses_server else 0.0, m)


async def latency(
    systems: Sequence[System], k: int, rounds: int, meter: Meter
) -> dict[str, list[Sample]]:
    """One conversation of K steps per system per round, one at a time."""
    out: dict[str, list[Sample]] = {s.key: [] for s in systems}
    for r in range(rounds):
        for s in rotated(systems, r):
            out[s.key].append(await meter.measure(s, lambda s=s: s.run(k)))
    return out


async def throughput(
    systems: Sequence[System], n: int, k: int, rounds: int, meter: Meter
) -> dict[str, list[Sample]]:
    """N conversations at once per system per round: from the first start to the last end."""
    out: dict[str, list[Sample]] = {s.key: [] for s in systems}

    async def batch(s: System) -> None:
        await asyncio.gather(*(s.run(k) for _ in range(n)))

    for r in range(rounds):
        for s in rotated(systems, r):
            out[s.key].append(await meter.measure(s, lambda s=s: batch(s)))
    return out


# --------------------------------------------------------------------------- history


@dataclass
class History:
    """A run's history (all its continued-as-new runs in order), cut into model steps."""

    runs: int
    events: int
    total_bytes: int
    step_bytes: list[int]  # step i (from model call i to model call i+1), i = 1..K+1
    wft: int = 0
    wft_wait: float = 0.0  # Σ workflow task scheduled → started
    wft_run: float = 0.0  # Σ workflow task started → completed (the worker's own time)
    activity: float = 0.0  # Σ activity scheduled → completed
    activities: int = 0
    span: float = 0.0
    seconds: float = 0.0  # the run's wall time, start to result (client side)
    stored: int | None = None  # payloads the history holds a reference to (None: not read)

    def per_step(self, step: int, window: int = 5) -> float:
        """Median bytes of the `window` steps ending at `step` (one-off events, such as a
        continue-as-new, do not move it)."""
        xs = sorted(self.step_bytes[max(0, step - window) : step])
        return float(xs[len(xs) // 2]) if xs else float("nan")


async def fetch_history(client: Client, workflow_id: str, model_activity: str) -> History:
    runs = []
    async for e in client.list_workflows(f"WorkflowId = '{workflow_id}'"):
        runs.append((e.start_time, e.run_id))
    if not runs:  # visibility lags: the latest run alone
        runs = [(None, None)]
    events = []
    for _, run_id in sorted(runs, key=lambda x: (x[0] is None, x[0])):
        h = await client.get_workflow_handle(workflow_id, run_id=run_id).fetch_history()
        events += list(h.events)
    hist = History(len(runs), len(events), sum(e.ByteSize() for e in events), [])
    current = -1  # bytes before the first model call are the start, not a step
    scheduled: dict[int, Any] = {}
    wft_scheduled = wft_started = None
    for e in events:
        at = e.event_time.ToDatetime()
        if e.HasField("activity_task_scheduled_event_attributes"):
            scheduled[e.event_id] = at
            hist.activities += 1
            if e.activity_task_scheduled_event_attributes.activity_type.name == model_activity:
                hist.step_bytes.append(0)
                current = len(hist.step_bytes) - 1
        elif e.HasField("activity_task_completed_event_attributes"):
            sched = scheduled.pop(e.activity_task_completed_event_attributes.scheduled_event_id, 0)
            if sched:
                hist.activity += (at - sched).total_seconds()
        elif e.HasField("workflow_task_scheduled_event_attributes"):
            wft_scheduled = at
        elif e.HasField("workflow_task_started_event_attributes") and wft_scheduled:
            hist.wft_wait += (at - wft_scheduled).total_seconds()
            wft_started = at
        elif e.HasField("workflow_task_completed_event_attributes") and wft_started:
            hist.wft += 1
            hist.wft_run += (at - wft_started).total_seconds()
        if current >= 0:
            hist.step_bytes[current] += e.ByteSize()
    if events:
        first, last = events[0].event_time.ToDatetime(), events[-1].event_time.ToDatetime()
        hist.span = (last - first).total_seconds()
    hist.stored = sum(stored_payloads(e) for e in events)
    return hist


def stored_payloads(msg: Message) -> int:
    """How many payloads under `msg` are references to payload storage."""
    if isinstance(msg, Payload):
        return len(msg.external_payloads)
    count = 0
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if isinstance(value, Message):
            items = [value]
        elif fd.message_type.GetOptions().map_entry:
            items = [v for v in value.values() if isinstance(v, Message)]
        else:
            items = list(value)  # a repeated message field
        count += sum(stored_payloads(item) for item in items)
    return count


async def history(system: TemporalSystem, k: int) -> History:
    t0 = time.perf_counter()
    run_id = await system.run(k)
    seconds = time.perf_counter() - t0
    h = await fetch_history(system.client, run_id, MODEL_ACTIVITIES[system.key])
    h.seconds = seconds
    return h


# --------------------------------------------------------------------------- parked runs


@dataclass
class Parked:
    runs: int
    rss_idle: int  # the worker's RSS after warm-up, nothing running
    rss_parked: int  # with `runs` runs waiting for an approval
    seconds: float  # to start them all and see them all waiting


async def until(check: Callable[[], Awaitable[bool]], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not after {timeout:.0f} s")
        await asyncio.sleep(0.05)


async def waiting_count(system: TemporalSystem, handles: Sequence[WorkflowHandle[Any, Any]]) -> int:
    """How many of these runs wait for an approval right now."""
    if isinstance(system, KeelSystem):
        query = f"TaskQueue = '{system.task_queue}' AND AgentStatus = 'waiting_approval'"
        return (await system.client.count_workflows(query)).count
    sem = asyncio.Semaphore(50)

    async def one(h: WorkflowHandle[Any, Any]) -> bool:
        async with sem:
            return bool(await h.query("waiting"))

    return sum(await asyncio.gather(*(one(h) for h in handles)))


async def park(system: TemporalSystem, n: int) -> Parked:
    """Start N runs whose first tool call waits for a person; the worker's memory then."""
    await asyncio.sleep(1.0)
    idle = rss_bytes(system.pid)
    t0 = time.monotonic()
    sem = asyncio.Semaphore(50)

    async def start(i: int) -> WorkflowHandle[Any, Any]:
        async with sem:
            started = await begin_waiting(system, f"park{i}")
            return started.waiter

    handles = await asyncio.gather(*(start(i) for i in range(n)))

    async def all_waiting() -> bool:
        return await waiting_count(system, handles) >= n

    await until(all_waiting, 600, f"{n} runs waiting for approval")
    seconds = time.monotonic() - t0
    await asyncio.sleep(1.0)
    return Parked(n, idle, rss_bytes(system.pid), seconds)


async def begin_waiting(system: TemporalSystem, tag: str) -> Started:
    """A run of "count to 1" whose tool call will wait for an approval (signal)."""
    if isinstance(system, KeelSystem):
        return await system.begin(1, tag, agent="bench_approval")
    from bench.conversation import prompt
    from bench.systems.temporal_loop import WORKFLOW, LoopInput

    run_id = system.new_id(1)
    handle = await system.client.start_workflow(
        WORKFLOW,
        LoopInput(prompt(1, tag), approval=True),
        id=run_id,
        task_queue=system.task_queue,
        execution_timeout=timedelta(minutes=30),
    )
    return Started(run_id, 1, handle)


# --------------------------------------------------------------------------- approval to resume


@dataclass
class Resume:
    """Approval (or signal) to the next model request, and until the client call returned."""

    to_model: list[float] = field(default_factory=list)
    client_call: list[float] = field(default_factory=list)


async def parked_keel(keel: KeelSystem, arrivals: Arrivals, tag: str) -> tuple[Started, str]:
    """A Keel run waiting for the approval of its first tool call, and that call's id."""
    started = await begin_waiting(keel, tag)
    await arrivals.wait(tag, results=0)
    call_id = ""

    async def pending() -> bool:
        nonlocal call_id
        state = await keel.agents.get_state(started.run_id)
        if state.pending_approvals:
            call_id = state.pending_approvals[0].call_id
        return bool(call_id)

    await until(pending, 60, "the approval request")
    return started, call_id


async def parked_loop(loop: TemporalSystem, arrivals: Arrivals, tag: str, bare: bool) -> Started:
    """A hand-written loop waiting for its `approve` signal (or the bare workflow for `go`)."""
    from bench.conversation import prompt

    if bare:
        run_id = loop.new_id(1)
        handle = await loop.client.start_workflow(
            "bench.BareSignal",
            prompt(1, tag),
            id=run_id,
            task_queue=loop.task_queue,
            execution_timeout=timedelta(minutes=5),
        )
        started = Started(run_id, 1, handle)
    else:
        started = await begin_waiting(loop, tag)
        await arrivals.wait(tag, results=0)

    async def waiting() -> bool:
        return bool(await started.waiter.query("waiting"))

    await until(waiting, 60, "the run to wait")
    return started


async def approval_round(
    variant: str, keel: KeelSystem, loop: TemporalSystem, arrivals: Arrivals, tag: str
) -> tuple[float, float]:
    """One sample: park a run, send the decision (or signal) at t0, wait for the model."""
    if variant.startswith("keel"):
        started, call_id = await parked_keel(keel, arrivals, tag)
        decision = DecideInput(call_id=call_id, decision=Decision.APPROVE, approver="bench")
        wait = variant == "keel_update"  # False: the decision goes as the keel.decide signal
        await asyncio.sleep(0.2)  # the worker is idle when the decision goes
        t0 = time.monotonic()
        await keel.agents.decide(started.run_id, decision, wait=wait)
    else:
        bare = variant == "bare_signal"
        started = await parked_loop(loop, arrivals, tag, bare)
        await asyncio.sleep(0.2)
        t0 = time.monotonic()
        await started.waiter.signal("go" if bare else "approve")
    sent = time.monotonic() - t0
    arrived = await arrivals.wait(tag, results=1, after=t0)
    if variant.startswith("keel"):
        await keel.finish(started)
    elif variant == "loop_signal":
        await loop.finish(started)
    else:
        await started.waiter.result()
    return arrived - t0, sent


async def approvals(
    keel: KeelSystem, loop: TemporalSystem, arrivals: Arrivals, samples: int
) -> dict[str, Resume]:
    variants = ["keel_update", "keel_signal", "loop_signal", "bare_signal"]
    out = {v: Resume() for v in variants}
    for i in range(samples):
        for v in rotated(variants, i):
            to_model, call = await approval_round(v, keel, loop, arrivals, f"ap-{v}-{i}")
            out[v].to_model.append(to_model)
            out[v].client_call.append(call)
    return out


# --------------------------------------------------------------------------- recovery


@dataclass
class Recovery:
    runs: int
    k: int
    delay_ms: int
    restart: float  # seconds from the kill until the new worker process served
    to_progress: list[float]  # per run: kill → its next model request at the endpoint
    to_next_step: list[float]  # per run: kill → a request with more tool results than before
    model_calls: list[int]  # per run: model requests the endpoint saw (K+1 with none redone)
    completed: int
    error: str = ""


async def recovery(
    system: System, arrivals: Arrivals, runs: int, k: int, delay_ms: int
) -> Recovery:
    """Runs in flight, the worker SIGKILLed, a new worker started at once: per run, how long
    until it made progress again, and whether it finished with no step lost."""
    tags = [f"rec-{system.key}-{i}" for i in range(runs)]
    started = [await system.begin(k, tag, delay_ms) for tag in tags]
    for tag in tags:  # every run well into its conversation
        await arrivals.wait(tag, results=3, timeout=300)
    assert system.proc is not None
    killed = time.monotonic()
    system.proc.kill()
    before = {tag: arrivals.last_results(tag) for tag in tags}
    try:
        await system.proc.stop()
    except ProcError:
        pass
    restart = await system.spawn()
    if isinstance(system, LoopRunner):  # LangGraph: resume each thread from its checkpoint
        started = [await system.resume(s) for s in started]
    result = Recovery(runs, k, delay_ms, restart, [], [], [], 0)
    waits = [arrivals.wait(tag, after=killed, timeout=600) for tag in tags]
    steps = [arrivals.wait(tag, more_than=before[tag], timeout=600) for tag in tags]
    for t in await asyncio.gather(*waits):
        result.to_progress.append(t - killed)
    for t in await asyncio.gather(*steps):
        result.to_next_step.append(t - killed)
    outcomes = await asyncio.gather(*(system.finish(s) for s in started), return_exceptions=True)
    errors = [o for o in outcomes if isinstance(o, BaseException)]
    result.completed = runs - len(errors)
    result.error = f"{type(errors[0]).__name__}: {errors[0]}" if errors else ""
    result.model_calls = [arrivals.count(tag) for tag in tags]
    return result
