"""Wires workflows, activities and the data converter into a Temporal Worker."""

from __future__ import annotations

import logging
from typing import Any

from temporalio.api.operatorservice.v1 import (
    AddSearchAttributesRequest,
    ListSearchAttributesRequest,
)
from temporalio.client import Client
from temporalio.service import RPCError
from temporalio.worker import Worker

from activities import AGENTS, AgentRegistry, ModelActivities, build_activities
from activities.registry import Agent
from activities.support import Ledger
from client.config import MODEL_PORT, STATE_DIR, Settings
from workflows import WORKFLOWS
from workflows.errors import WORKFLOW_FAILURE_TYPES
from workflows.models import SEARCH_ATTRIBUTES

log = logging.getLogger("keel.worker")


def build_worker(
    client: Client,
    *,
    settings: Settings,
    agents: list[Agent] | None = None,
    resources: Any = None,
    model_base_url: str | None = None,
    **worker_options: Any,
) -> Worker:
    """A worker serving `agents` (the default ones if None) on the settings' task queue."""
    base_url = settings.openai_base_url or model_base_url
    if base_url is None and settings.uses_scripted_model:
        base_url = f"http://127.0.0.1:{MODEL_PORT}/v1"
    default_model = settings.model
    if default_model == "scripted" and not settings.uses_scripted_model:
        default_model = "gpt-4o-mini"
    registry = AgentRegistry(AGENTS if agents is None else agents, default_model=default_model)
    model = ModelActivities(base_url, settings.openai_api_key, default_model)
    return Worker(
        client,
        task_queue=settings.task_queue,
        workflows=WORKFLOWS,
        activities=build_activities(registry, model, resources),
        workflow_failure_exception_types=WORKFLOW_FAILURE_TYPES,
        **worker_options,
    )


async def ensure_search_attributes(client: Client) -> None:
    """Register Keel's search attributes where the server lets us (not on Temporal Cloud)."""
    try:
        have = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=client.namespace)
        )
        existing = set(have.custom_attributes)
    except RPCError:
        existing = set()  # servers without the list call (the time-skipping test server)
    for key in SEARCH_ATTRIBUTES:
        if key.name in existing:
            continue
        try:
            await client.operator_service.add_search_attributes(
                AddSearchAttributesRequest(
                    namespace=client.namespace,
                    search_attributes={key.name: int(key.indexed_value_type)},
                )
            )
        except RPCError as e:
            if "already" not in e.message.lower():
                # a managed cluster registers them through its own console
                log.warning("could not register search attribute %s: %s", key.name, e.message)


async def run_worker(settings: Settings, model_base_url: str | None = None) -> None:
    """Connect, make sure the search attributes exist, and serve until cancelled."""
    from client.api import connect

    client = await connect(settings)
    await ensure_search_attributes(client)
    ledger = Ledger(STATE_DIR / "ledger.db")
    worker = build_worker(
        client, settings=settings, resources=ledger, model_base_url=model_base_url
    )
    log.info("worker serving task queue %s at %s", settings.task_queue, settings.address)
    await worker.run()


def main() -> None:
    """`python worker.py`: the same as `keel worker`."""
    from client.cli import main as keel

    keel(["worker"])


if __name__ == "__main__":
    main()
