"""One benchmark worker process: a Temporal worker for one system, or the process that runs
the loops of a system without a server (the plain loop, LangGraph).

    python -m bench.serve SYSTEM --address HOST:PORT --task-queue Q --model-url URL
        [--payload-dir DIR --payload-threshold BYTES] [--state-dir DIR]

It prints `READY` once it serves and stops on SIGTERM or when stdin closes. The loop
runners take JSON commands on stdin (`{"id", "op": "run", "prompt", "thread"}` or
`{"id", "op": "resume", "thread"}`) and answer each on stdout (`{"id", "answer"}` or
`{"id", "error"}`), running many at once.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import signal
import sys
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from openai import AsyncOpenAI
from temporalio.client import Client
from temporalio.converter import DataConverter, ExternalStorage
from temporalio.worker import Worker

from bench.conversation import MODEL
from keel.config import DEFAULT_PAYLOAD_THRESHOLD, Settings
from keel.plugin import ModelProvider, build_worker
from keel.storage import LocalDirectoryDriver

MODEL_URL_ENV = "BENCH_MODEL_URL"  # bench.systems.pydantic_ai_temporal reads it

KEEL_SYSTEMS = ("keel", "keel_local", "keel_api", "keel_stored")  # the client side tells them apart
TEMPORAL_SYSTEMS = (*KEEL_SYSTEMS, "temporal_loop", "openai_agents", "pydantic_ai")
LOOP_SYSTEMS = ("plain", "langgraph", "langgraph_sync")
MODEL_TIMEOUT = 60.0


@dataclass(frozen=True)
class ServeConfig:
    system: str
    address: str
    task_queue: str
    model_url: str
    payload_dir: str | None = None
    payload_threshold: int = DEFAULT_PAYLOAD_THRESHOLD
    state_dir: str = "."

    def argv(self) -> list[str]:
        """The command line that starts this worker."""
        out = [
            sys.executable,
            "-m",
            "bench.serve",
            self.system,
            "--address",
            self.address,
            "--task-queue",
            self.task_queue,
            "--model-url",
            self.model_url,
            "--state-dir",
            self.state_dir,
        ]
        if self.payload_dir:
            out += ["--payload-dir", self.payload_dir]
            out += ["--payload-threshold", str(self.payload_threshold)]
        return out

    def converter(self, base: DataConverter = DataConverter.default) -> DataConverter:
        """`base`, with payloads above the threshold stored in the payload directory (as
        KEEL_PAYLOAD_DIR does for Keel) when one is given."""
        if not self.payload_dir:
            return base
        storage = ExternalStorage(
            drivers=[LocalDirectoryDriver(self.payload_dir)],
            payload_size_threshold=self.payload_threshold,
        )
        return dataclasses.replace(base, external_storage=storage)

    def openai(self) -> AsyncOpenAI:
        return AsyncOpenAI(
            base_url=self.model_url, api_key="not-needed", max_retries=0, timeout=MODEL_TIMEOUT
        )


def parse(argv: list[str] | None) -> ServeConfig:
    p = argparse.ArgumentParser(prog="python -m bench.serve")
    p.add_argument("system", choices=TEMPORAL_SYSTEMS + LOOP_SYSTEMS)
    p.add_argument("--address", required=True)
    p.add_argument("--task-queue", default="bench")
    p.add_argument("--model-url", required=True)
    p.add_argument("--payload-dir")
    p.add_argument("--payload-threshold", type=int, default=DEFAULT_PAYLOAD_THRESHOLD)
    p.add_argument("--state-dir", default=".")
    a = p.parse_args(argv)
    return ServeConfig(
        a.system,
        a.address,
        a.task_queue,
        a.model_url,
        a.payload_dir,
        a.payload_threshold,
        a.state_dir,
    )


# --------------------------------------------------------------------------- Temporal workers


async def keel_worker(cfg: ServeConfig) -> Worker:
    from bench.systems.keel_agents import agents

    settings = Settings(
        address=cfg.address,
        task_queue=cfg.task_queue,
        payload_dir=cfg.payload_dir,
        payload_threshold=cfg.payload_threshold,
    )
    client = await Client.connect(cfg.address, data_converter=settings.data_converter())
    return build_worker(
        client,
        settings=settings,
        agents=agents(local=cfg.system == "keel_local"),
        model=ModelProvider(base_url=cfg.model_url, model=MODEL),
    )


async def loop_worker(cfg: ServeConfig) -> Worker:
    from bench.systems.temporal_loop import WORKFLOWS, LoopActivities

    client = await Client.connect(cfg.address, data_converter=cfg.converter())
    acts = LoopActivities(cfg.openai())
    return Worker(
        client,
        task_queue=cfg.task_queue,
        workflows=WORKFLOWS,
        activities=[acts.call_model, acts.run_tool],
    )


async def openai_agents_worker(cfg: ServeConfig) -> Worker:
    from agents import OpenAIProvider
    from temporalio.openai_agents import ModelActivityParameters, OpenAIAgentsPlugin

    from bench.systems.openai_agents_temporal import ACTIVITIES, WORKFLOWS

    plugin = OpenAIAgentsPlugin(
        model_params=ModelActivityParameters(start_to_close_timeout=timedelta(seconds=60)),
        model_provider=OpenAIProvider(openai_client=cfg.openai(), use_responses=False),
    )
    client = await Client.connect(cfg.address, data_converter=cfg.converter(), plugins=[plugin])
    return Worker(client, task_queue=cfg.task_queue, workflows=WORKFLOWS, activities=ACTIVITIES)


async def pydantic_ai_worker(cfg: ServeConfig) -> Worker:
    os.environ[MODEL_URL_ENV] = cfg.model_url  # read when the workflow module is imported
    from pydantic_ai.durable_exec.temporal import PydanticAIPlugin

    from bench.systems.pydantic_ai_temporal import WORKFLOWS

    client = await Client.connect(
        cfg.address, data_converter=cfg.converter(), plugins=[PydanticAIPlugin()]
    )
    return Worker(client, task_queue=cfg.task_queue, workflows=WORKFLOWS)


WORKERS: dict[str, Callable[[ServeConfig], Awaitable[Worker]]] = {
    **{key: keel_worker for key in KEEL_SYSTEMS},
    "temporal_loop": loop_worker,
    "openai_agents": openai_agents_worker,
    "pydantic_ai": pydantic_ai_worker,
}


# --------------------------------------------------------------------------- loop runners


async def loop_runner(cfg: ServeConfig, stop: asyncio.Event) -> None:
    """Run conversations in this process as the commands on stdin ask."""
    client = cfg.openai()
    if cfg.system == "plain":
        from bench.systems import plain_loop

        async def run(cmd: dict[str, Any]) -> str:
            return await plain_loop.run(client, cmd["prompt"])

        await answer_commands(run, stop)
        return
    from langgraph.checkpoint.sqlite.aio import AsyncSqliteSaver
    from langgraph.types import Durability

    from bench.systems import langgraph_sqlite

    db = os.path.join(cfg.state_dir, "langgraph.sqlite")
    async with AsyncSqliteSaver.from_conn_string(db) as saver:
        await saver.setup()
        await saver.conn.execute("PRAGMA synchronous=NORMAL")
        graph = langgraph_sqlite.build(client, saver)

        durability: Durability = "sync" if cfg.system == "langgraph_sync" else "async"

        async def run_graph(cmd: dict[str, Any]) -> str:
            if cmd["op"] == "resume":
                return await langgraph_sqlite.resume(graph, cmd["thread"], durability)
            return await langgraph_sqlite.run(graph, cmd["prompt"], cmd["thread"], durability)

        await answer_commands(run_graph, stop)


async def answer_commands(
    run: Callable[[dict[str, Any]], Awaitable[str]], stop: asyncio.Event
) -> None:
    loop = asyncio.get_running_loop()
    commands: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue()

    def read_stdin() -> None:
        for line in sys.stdin:
            if line.strip():
                loop.call_soon_threadsafe(commands.put_nowait, json.loads(line))
        loop.call_soon_threadsafe(commands.put_nowait, None)

    threading.Thread(target=read_stdin, daemon=True).start()
    tasks: set[asyncio.Task[None]] = set()

    async def handle(cmd: dict[str, Any]) -> None:
        try:
            reply: dict[str, Any] = {"id": cmd["id"], "answer": await run(cmd)}
        except Exception as e:  # reported to the harness, which fails the measurement
            reply = {"id": cmd["id"], "error": f"{type(e).__name__}: {e}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()

    print("READY", flush=True)
    waiter = asyncio.create_task(stop.wait())
    while True:
        getter = asyncio.create_task(commands.get())
        done, _ = await asyncio.wait({getter, waiter}, return_when=asyncio.FIRST_COMPLETED)
        if waiter in done:
            getter.cancel()
            break
        cmd = getter.result()
        if cmd is None:
            break
        task = asyncio.create_task(handle(cmd))
        tasks.add(task)
        task.add_done_callback(tasks.discard)


# --------------------------------------------------------------------------- main


async def serve(cfg: ServeConfig) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if cfg.system in LOOP_SYSTEMS:
        await loop_runner(cfg, stop)
        return

    def watch_stdin() -> None:
        sys.stdin.read()
        loop.call_soon_threadsafe(stop.set)

    threading.Thread(target=watch_stdin, daemon=True).start()
    worker = await WORKERS[cfg.system](cfg)
    async with worker:
        print("READY", flush=True)
        await stop.wait()


def main(argv: list[str] | None = None) -> None:
    code = 0
    try:
        asyncio.run(serve(parse(argv)))
    except KeyboardInterrupt:
        pass
    except Exception:
        import traceback

        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)  # the temporalio native runtime can abort in interpreter exit hooks


if __name__ == "__main__":
    main()
