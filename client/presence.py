"""Whether a worker serves a task queue, as Temporal's matching service knows its pollers.

A run waits on its task queue until a worker polls it, and nothing on the run says so: a
client asks here, so that it can say plainly which queue has no worker instead of waiting in
silence.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from temporalio.api.enums.v1 import TaskQueueType
from temporalio.api.taskqueue.v1 import TaskQueue
from temporalio.api.workflowservice.v1 import DescribeTaskQueueRequest
from temporalio.client import Client
from temporalio.service import RPCError

WORKER_SEEN_SECONDS = 70.0  # workers long-poll for up to a minute
LOOK_EVERY = 0.5


async def worker_polls(client: Client, task_queue: str) -> bool | None:
    """Whether a worker has polled the task queue for workflow tasks lately; None when the
    server would not say."""
    try:
        pollers = await client.workflow_service.describe_task_queue(
            DescribeTaskQueueRequest(
                namespace=client.namespace,
                task_queue=TaskQueue(name=task_queue),
                task_queue_type=TaskQueueType.TASK_QUEUE_TYPE_WORKFLOW,
            )
        )
    except RPCError:
        return None
    now = datetime.now(UTC).timestamp()
    return any(now - p.last_access_time.ToSeconds() < WORKER_SEEN_SECONDS for p in pollers.pollers)


async def worker_arrives(client: Client, task_queue: str, patience: float) -> bool:
    """Whether a worker polls the task queue now or within `patience` seconds (one starting
    at the same moment); True when the server would not say."""
    loop = asyncio.get_running_loop()
    give_up = loop.time() + patience
    while True:
        seen = await worker_polls(client, task_queue)
        if seen is not False:
            return True
        if loop.time() >= give_up:
            return False
        await asyncio.sleep(LOOK_EVERY)
