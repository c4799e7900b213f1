"""What `keel chaos` strikes and injects: the embedded Temporal dev server (killed and
started again on its SQLite file), the worker processes (SIGKILLed and replaced), the model's
faults and the malformed signals runs must refuse."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from temporalio.api.common.v1 import Payload, WorkflowExecution
from temporalio.api.enums.v1 import PendingActivityState
from temporalio.api.workflowservice.v1 import GetWorkflowExecutionHistoryReverseRequest
from temporalio.client import Client
from temporalio.common import RawValue
from temporalio.service import RPCError

from keel.chaos.agent import MODEL_TIMEOUT_SECONDS
from keel.chaos.check import MALLORY
from keel.config import Settings
from keel.dev import DevStackError, dev_server_args, temporal_binary, try_connect
from keel.workflows.models import SEARCH_ATTRIBUTES, SIGNAL_DECIDE, SIGNAL_MESSAGE

T = TypeVar("T")
SERVER_START_TIMEOUT = 60.0
RPC_TIMEOUT = timedelta(seconds=10)
WORKER_CODE = "import sys; from keel.client.cli import main; main(sys.argv[1:])"


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def fault_specs(rate: float, seed: int) -> list[dict[str, Any]]:
    """Four fault kinds, each on a quarter of `rate` of all requests (faults are tried in
    order, so each rate is of the requests the ones before let through)."""
    kinds: list[dict[str, Any]] = [
        {"kind": "429", "retry_after": 1},
        {"kind": "500"},
        {"kind": "slow", "delay": MODEL_TIMEOUT_SECONDS + 2},  # the client gives up first
        {"kind": "malformed"},
    ]
    share, taken, out = rate / len(kinds), 0.0, []
    for i, k in enumerate(kinds):
        out.append({**k, "rate": min(share / (1 - taken), 1.0), "seed": seed * 10 + i})
        taken += share
    return out if rate > 0 else []


def malformed_signal(which: int) -> tuple[str, list[Any]]:
    """Signals a run must refuse, and record as refused, without failing."""
    not_json = RawValue(Payload(metadata={"encoding": b"json/plain"}, data=b"{not json"))
    bad: list[tuple[str, list[Any]]] = [
        (SIGNAL_DECIDE, [not_json]),
        (SIGNAL_DECIDE, [{"call_id": 7}]),
        (SIGNAL_DECIDE, [{"call_id": "call_nope", "decision": "approve", "approver": MALLORY}]),
        (SIGNAL_DECIDE, []),
        (SIGNAL_MESSAGE, [{"text": ["not", "text"], "policy": "shout"}]),
        (SIGNAL_MESSAGE, ["one", "two"]),
        ("keel.nonsense", [{"hello": "world"}]),
    ]
    return bad[which % len(bad)]


class DevServer:
    """The embedded Temporal dev server, on a SQLite file so it can die and come back."""

    def __init__(self, home: Path, port: int) -> None:
        self.home = home
        self.port = port
        self.address = f"127.0.0.1:{port}"
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        """Start it and wait until it answers."""
        args = [
            "server", "start-dev", "--db-filename", str(self.home / "temporal.db"),
            "--ip", "127.0.0.1", "--port", str(self.port), "--headless",
            "--log-level", "error", *dev_server_args(),
        ]  # fmt: skip
        for key in SEARCH_ATTRIBUTES:
            args += ["--search-attribute", f"{key.name}={key.indexed_value_type.name.capitalize()}"]
        log = open(self.home / "temporal.log", "ab")  # noqa: SIM115 - the process keeps it
        self._proc = await asyncio.create_subprocess_exec(
            temporal_binary(), *args, stdout=log, stderr=log, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self._proc.returncode is not None:
                raise DevStackError(
                    f"the Temporal dev server exited ({self._proc.returncode}); "
                    f"see {self.home / 'temporal.log'}"
                )
            if await try_connect(Settings(address=self.address)) is not None:
                return
            if time.monotonic() > deadline:
                raise DevStackError("the Temporal dev server did not answer within 60 s")
            await asyncio.sleep(0.3)

    async def kill(self) -> None:
        """SIGKILL: no goodbye, as a crash."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()

    async def stop(self) -> None:
        if self._proc is None or self._proc.returncode is not None:
            return
        self._proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(self._proc.wait(), 15)
        except TimeoutError:
            await self.kill()


class WorkerPool:
    """Worker processes (`keel worker`) serving the chaos agent."""

    def __init__(self, n: int, env: Callable[[int], dict[str, str]], logs: Path) -> None:
        self.env = env  # each worker's environment
        self.logs = logs
        self.procs: list[asyncio.subprocess.Process | None] = [None] * n
        self.started = 0

    async def start(self, i: int) -> asyncio.subprocess.Process:
        self.started += 1
        log = open(self.logs / f"worker-{i}.log", "ab")  # noqa: SIM115 - the process keeps it
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-c", WORKER_CODE, "worker",
            "--agents", "keel.chaos.agent:AGENTS",
            "--resources", "keel.chaos.agent:ledger",
            env=self.env(i), stdout=log, stderr=log, start_new_session=True,
        )  # fmt: skip
        log.close()
        self.procs[i] = proc
        return proc

    def alive(self) -> list[int]:
        return [i for i, p in enumerate(self.procs) if p is not None and p.returncode is None]

    def exited(self) -> list[tuple[int, int, int]]:
        """Workers that died on their own: (slot, pid, exit code)."""
        return [
            (i, p.pid, p.returncode)
            for i, p in enumerate(self.procs)
            if p is not None and p.returncode is not None
        ]

    def last_words(self, i: int) -> str:
        """The last line worker `i` logged (why it exited, when it did so by itself)."""
        try:
            lines = (self.logs / f"worker-{i}.log").read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return next((line.strip() for line in reversed(lines) if line.strip()), "")[:300]

    async def restart(self, i: int) -> int:
        """SIGKILL worker `i` and start a new one in its place; returns the dead one's pid."""
        proc, self.procs[i] = self.procs[i], None  # not "exited by itself" meanwhile
        assert proc is not None
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
        await self.start(i)
        return proc.pid

    async def stop(self) -> None:
        for proc in self.procs:
            if proc is not None and proc.returncode is None:
                proc.kill()
                await proc.wait()


def identity(pid: int) -> str:
    """The Temporal identity a worker process has by default."""
    return f"{pid}@{socket.gethostname()}"


async def retrying(fn: Callable[[], Awaitable[T]], until: float) -> T:
    """Call `fn` until it works or `until` (time.time()) passes; RPC failures (the server
    restarting) are retried, the last one raised."""
    delay = 0.2
    while True:
        try:
            return await fn()
        except (RPCError, RuntimeError):
            if time.time() > until:
                raise
        await asyncio.sleep(delay)
        delay = min(delay * 2, 2.0)


async def runs_on_worker(client: Client, runs: list[str], worker: str) -> list[str]:
    """Which of these runs a kill of `worker` (its identity) hits: those with an activity
    running there, or a workflow task taken by it or queued for it (a new workflow task goes
    to the sticky queue of the worker that took the last one)."""
    gate = asyncio.Semaphore(8)

    async def on_it(run_id: str) -> bool:
        async with gate:
            try:
                desc = await client.get_workflow_handle(run_id).describe(rpc_timeout=RPC_TIMEOUT)
                for a in desc.raw_description.pending_activities:
                    started = a.state == PendingActivityState.PENDING_ACTIVITY_STATE_STARTED
                    if started and a.last_worker_identity == worker:
                        return True
                history = await client.workflow_service.get_workflow_execution_history_reverse(
                    GetWorkflowExecutionHistoryReverseRequest(
                        namespace=client.namespace,
                        execution=WorkflowExecution(workflow_id=run_id),
                        maximum_page_size=40,
                    ),
                    timeout=RPC_TIMEOUT,
                )
            except (RPCError, RuntimeError):
                return False
        events = list(history.history.events)
        if not events or not (
            events[0].HasField("workflow_task_started_event_attributes")
            or events[0].HasField("workflow_task_scheduled_event_attributes")
        ):
            return False  # waiting on an activity, a timer or a person: not on a worker
        for e in events:
            if e.HasField("workflow_task_started_event_attributes"):
                return e.workflow_task_started_event_attributes.identity == worker
        return False

    found = await asyncio.gather(*(on_it(r) for r in runs))
    return [r for r, yes in zip(runs, found, strict=True) if yes]
