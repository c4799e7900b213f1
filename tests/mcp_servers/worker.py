"""A worker in a process of its own serving the hostile server's agent, so a test can
SIGKILL it in the middle of an MCP call."""

from __future__ import annotations

import argparse
import asyncio

from keel.config import Settings, connect
from keel.plugin import ModelProvider, build_worker
from tests.mcp_servers.agents import hostile_agent


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--address", required=True)
    p.add_argument("--task-queue", required=True)
    p.add_argument("--model-url", required=True)
    p.add_argument("--mcp-url", required=True)
    a = p.parse_args()
    settings = Settings(address=a.address, task_queue=a.task_queue)
    worker = build_worker(
        await connect(settings),
        settings=settings,
        agents=[hostile_agent(a.mcp_url)],
        model=ModelProvider(base_url=a.model_url, model="scripted"),
    )
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main())
