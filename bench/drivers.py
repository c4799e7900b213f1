"""The harness's side of each system: start its worker process, run a conversation, check it.

A `System` runs the conversation "count to K" (`run`), or starts it and finishes it later
(`begin` / `finish`, for runs that must be in flight when their worker is killed). Every
run's answer is checked, so a failure never passes for a fast run.
"""

from __future__ import annotations

import asyncio
import importlib
import uuid
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

from temporalio.client import Client, WorkflowHandle
from temporalio.converter import DataConverter

from bench.conversation import WrongAnswer, check, prompt
from bench.harness import Proc, child_env
from bench.serve import MODEL_URL_ENV, ServeConfig
from keel.client.api import AgentClient
from keel.config import DEFAULT_PAYLOAD_THRESHOLD, Settings
from keel.workflows.models import AgentStatus

RUN_TIMEOUT = timedelta(minutes=30)
IN_PROCESS = ("plain", "langgraph", "langgraph_sync")  # no server: the loop runs in the worker
# Keel's payload storage at its most: nearly every payload of a run passes this threshold
STORED_THRESHOLD = 512


@dataclass(frozen=True)
class Spec:
    """A system as the report names it, and what it needs to run here."""

    key: str
    label: str
    needs: str = ""  # a module that must import (the peer's package), else unavailable
    # one way of running Keel, measured beside Keel's default for Keel's own overhead:
    # in the latency rounds (and where a run's time goes) only
    variant: bool = False


SPECS = [
    Spec("keel", "Keel (default)"),
    Spec("keel_local", "Keel, local read-only tools"),
    Spec("keel_api", "Keel, waited for with `AgentClient.result`", variant=True),
    Spec(
        "keel_stored",
        f"Keel, payload storage at a {STORED_THRESHOLD}-byte threshold",
        variant=True,
    ),
    Spec("temporal_loop", "hand-written Temporal loop"),
    Spec(
        "openai_agents",
        "Temporal + OpenAI Agents SDK",
        "bench.systems.openai_agents_temporal",
    ),
    Spec("pydantic_ai", "Temporal + Pydantic AI", "bench.systems.pydantic_ai_temporal"),
    Spec("langgraph", "LangGraph + SQLite checkpointer", "bench.systems.langgraph_sqlite"),
    Spec(
        "langgraph_sync",
        'LangGraph + SQLite, durability="sync"',
        "bench.systems.langgraph_sqlite",
    ),
    Spec("plain", "plain in-process loop"),
]
LABELS = {s.key: s.label for s in SPECS}
VARIANTS = tuple(s.key for s in SPECS if s.variant)


def unavailable(spec: Spec) -> str | None:
    """Why this system cannot run here (None: it can)."""
    if spec.key == "keel_local":
        from bench.systems.keel_agents import LOCAL_TOOLS

        if not LOCAL_TOOLS:
            return "not available in this build: keel's `tool` takes no `local=True`"
    if spec.needs:
        try:
            importlib.import_module(spec.needs)
        except Exception as e:  # an ImportError, or the package failing at import
            return f"cannot import {spec.needs}: {type(e).__name__}: {e}"
    return None


@dataclass
class Env:
    """What every system shares: the dev server, the fake endpoint, a working directory."""

    address: str
    model_url: str
    workdir: Path


@dataclass
class Started:
    """A run in flight: its id (workflow id or thread) and how to wait for its end."""

    run_id: str
    k: int
    waiter: Any = None


@dataclass
class System:
    spec: Spec
    env: Env
    payload_dir: str | None = None  # payload storage on: large payloads leave the history
    payload_threshold: int = DEFAULT_PAYLOAD_THRESHOLD
    task_queue: str = field(default_factory=lambda: f"bench-{uuid.uuid4().hex[:8]}")
    proc: Proc | None = None
    run_ids: list[str] = field(default_factory=list)

    @property
    def key(self) -> str:
        return self.spec.key

    @property
    def label(self) -> str:
        return self.spec.label

    @property
    def uses_server(self) -> bool:
        return self.key not in IN_PROCESS

    def config(self) -> ServeConfig:
        state = self.env.workdir / "state" / self.task_queue
        state.mkdir(parents=True, exist_ok=True)
        return ServeConfig(
            self.key,
            self.env.address,
            self.task_queue,
            self.env.model_url,
            self.payload_dir,
            self.payload_threshold,
            str(state),
        )

    async def spawn(self) -> float:
        """Start (or start again) the worker process; seconds until it served."""
        env = child_env({MODEL_URL_ENV: self.env.model_url, "OPENAI_AGENTS_DISABLE_TRACING": "1"})
        log = self.env.workdir / "logs" / f"{self.key}-{self.task_queue}.log"
        self.proc = Proc(self.label, self.config().argv(), log, env=env)
        await self.proc.start()
        return self.proc.started_in

    async def start(self) -> None:
        await self.spawn()
        await self.connect()

    async def connect(self) -> None:
        """Clients the harness needs (Temporal systems)."""

    async def stop(self) -> None:
        if self.proc is not None:
            await self.proc.stop()

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def run(self, k: int, tag: str | None = None, delay_ms: int = 0) -> str:
        started = await self.begin(k, tag, delay_ms)
        await self.finish(started)
        return started.run_id

    async def begin(self, k: int, tag: str | None = None, delay_ms: int = 0) -> Started:
        raise NotImplementedError

    async def finish(self, started: Started) -> None:
        raise NotImplementedError

    def new_id(self, k: int) -> str:
        run_id = f"{self.key}-k{k}-{uuid.uuid4().hex[:10]}"
        self.run_ids.append(run_id)
        return run_id


class LoopRunner(System):
    """The plain loop and LangGraph: conversations run inside the worker process itself."""

    async def begin(self, k: int, tag: str | None = None, delay_ms: int = 0) -> Started:
        assert self.proc is not None
        thread = self.new_id(k)
        request = self.proc.request(op="run", prompt=prompt(k, tag, delay_ms), thread=thread)
        return Started(thread, k, asyncio.ensure_future(request))

    async def finish(self, started: Started) -> None:
        reply = await started.waiter
        if "error" in reply:
            raise WrongAnswer(f"{self.label}: {reply['error']}")
        check(reply["answer"], started.k, self.label)

    async def resume(self, started: Started) -> Started:
        """Resume a run from its last checkpoint in the (new) worker process."""
        assert self.proc is not None
        old = started.waiter
        if old is not None and old.done() and not old.cancelled():
            old.exception()  # the process that ran it is gone: that answer never comes
        request = self.proc.request(op="resume", thread=started.run_id)
        return Started(started.run_id, started.k, asyncio.ensure_future(request))


class TemporalSystem(System):
    """A system whose runs are workflows on the shared dev server."""

    client: Client
    workflow = ""

    def converter(self) -> DataConverter:
        return self.config().converter()

    async def connect(self) -> None:
        self.client = await Client.connect(self.env.address, data_converter=self.converter())

    def argument(self, text: str) -> Any:
        return text

    def output(self, result: Any) -> str:
        return str(result)

    async def begin(self, k: int, tag: str | None = None, delay_ms: int = 0) -> Started:
        run_id = self.new_id(k)
        handle = await self.client.start_workflow(
            self.workflow,
            self.argument(prompt(k, tag, delay_ms)),
            id=run_id,
            task_queue=self.task_queue,
            execution_timeout=RUN_TIMEOUT,
        )
        return Started(run_id, k, handle)

    async def finish(self, started: Started) -> None:
        handle: WorkflowHandle[Any, Any] = started.waiter
        check(self.output(await handle.result()), started.k, self.label)


class LoopSystem(TemporalSystem):
    workflow = "bench.Loop"

    def argument(self, text: str) -> Any:
        from bench.systems.temporal_loop import LoopInput

        return LoopInput(text)


class OpenAIAgentsSystem(TemporalSystem):
    workflow = "bench.OpenAIAgents"


class PydanticAISystem(TemporalSystem):
    workflow = "bench.PydanticAI"


class KeelSystem(TemporalSystem):
    """Keel's default: started with `AgentClient.start`, its workflow's result awaited."""

    agents: AgentClient

    def settings(self) -> Settings:
        return Settings(
            address=self.env.address,
            task_queue=self.task_queue,
            payload_dir=self.payload_dir,
            payload_threshold=self.payload_threshold,
        )

    def converter(self) -> DataConverter:
        return self.settings().data_converter()

    async def connect(self) -> None:
        await super().connect()
        self.agents = AgentClient(self.client, self.settings())

    async def begin(
        self, k: int, tag: str | None = None, delay_ms: int = 0, agent: str = "bench"
    ) -> Started:
        run_id = await self.agents.start(
            agent,
            prompt(k, tag, delay_ms),
            user="bench",
            run_id=self.new_id(k),
            execution_timeout=RUN_TIMEOUT,
        )
        return Started(run_id, k, self.client.get_workflow_handle(run_id))

    async def finish(self, started: Started) -> None:
        from keel.workflows.agent import AgentWorkflow

        handle = self.client.get_workflow_handle_for(AgentWorkflow.run, started.run_id)
        result = await handle.result()
        if result.status != AgentStatus.COMPLETED:
            raise WrongAnswer(f"{self.label}: run ended {result.status} ({result.error})")
        check(result.final_answer, started.k, self.label)


class KeelApiSystem(KeelSystem):
    """As Keel's default, waited for as users do, with `AgentClient.result` (which follows
    the run's event stream for `idle` beside the workflow's result)."""

    async def finish(self, started: Started) -> None:
        result = await self.agents.result(started.run_id)
        if result.status != AgentStatus.COMPLETED:
            raise WrongAnswer(f"{self.label}: run ended {result.status} ({result.error})")
        check(result.final_answer, started.k, self.label)


class KeelStoredSystem(KeelSystem):
    """As Keel's default, its client and worker storing every payload above
    STORED_THRESHOLD bytes outside the history (KEEL_PAYLOAD_DIR)."""

    async def start(self) -> None:
        if self.payload_dir is None:
            self.payload_dir = str(self.env.workdir / "payloads" / self.task_queue)
            self.payload_threshold = STORED_THRESHOLD
        await super().start()


KINDS: dict[str, type[System]] = {
    "keel": KeelSystem,
    "keel_local": KeelSystem,
    "keel_api": KeelApiSystem,
    "keel_stored": KeelStoredSystem,
    "temporal_loop": LoopSystem,
    "openai_agents": OpenAIAgentsSystem,
    "pydantic_ai": PydanticAISystem,
    "langgraph": LoopRunner,
    "langgraph_sync": LoopRunner,
    "plain": LoopRunner,
}


def make(spec: Spec, env: Env, **options: Any) -> System:
    return KINDS[spec.key](spec, env, **options)
