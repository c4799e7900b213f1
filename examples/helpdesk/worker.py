"""The helpdesk's own worker: its workflows and activities, and Keel's agents beside them.

python worker.py          (TEMPORAL_ADDRESS, OPENAI_BASE_URL, ... from the environment)
"""

from __future__ import annotations

import asyncio

from agents import AGENTS, desk
from temporalio.client import Client
from temporalio.envconfig import ClientConfigProfile
from temporalio.worker import Worker

from activities import count_tickets
from keel import KeelPlugin
from workflows import PlanAndExecute, TicketReport

TASK_QUEUE = "helpdesk"


async def main() -> None:
    connect = ClientConfigProfile.load().to_client_connect_config()
    connect.setdefault("target_host", "localhost:7233")
    # The plugin on the client gives it Keel's data converter, and every worker built from
    # this client serves the agents (and Keel's default loop) beside its own workflows.
    client = await Client.connect(**connect, plugins=[KeelPlugin(AGENTS, resources=desk())])
    worker = Worker(
        client,
        task_queue=TASK_QUEUE,
        workflows=[PlanAndExecute, TicketReport],
        activities=[count_tickets],
    )
    print("helpdesk worker ready", flush=True)
    await worker.run()


if __name__ == "__main__":
    asyncio.run(main())
