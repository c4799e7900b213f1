"""A worker in a process of its own, so a test can SIGKILL it mid-run."""

from __future__ import annotations

import argparse
import asyncio

from keel.config import Settings, connect
from keel.demo.agent import Ledger
from keel.plugin import ModelProvider, build_worker
from tests.agents import TEST_AGENTS


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--task-queue", required=True)
    p.add_argument("--model-url", required=True)
    p.add_argument("--ledger", required=True)
    a = p.parse_args()
    settings = Settings(address=a.address, task_queue=a.task_queue)
    client = await connect(settings)
    worker = build_worker(
        client,
        settings=settings,
        agents=TEST_AGENTS,
        resources=Ledger(a.ledger),
        model=ModelProvider(base_url=a.model_url, model="scripted"),
    )
    print("worker ready", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main())
