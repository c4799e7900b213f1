"""Every way a run ends or stalls, and every place that says how it stands, in agreement:
`keel status`, `keel list --status` (one row per run: its latest execution), the AgentStatus
search attribute (with Temporal's own status for a run closed from outside Keel) and the
current details the Web UI shows."""

from __future__ import annotations

import json
import uuid
from datetime import timedelta
from typing import Any

import pytest
from temporalio.api.common.v1 import WorkflowExecution
from temporalio.api.enums.v1 import EventType
from temporalio.api.sdk.v1 import WorkflowMetadata
from temporalio.api.workflowservice.v1 import ResetWorkflowExecutionRequest
from temporalio.client import WorkflowExecutionStatus

from keel.client.visibility import TERMINATED, TIMED_OUT, run_status
from keel.workflows.models import AGENT_STATUS, AgentStatus
from tests.conftest import Harness, wait_for
from tests.test_cli import keel

T = WorkflowExecutionStatus
S = AgentStatus
# a run closed from outside Keel cannot say so itself: its AgentStatus and current details
# keep what it last said, and Temporal's status tells the rest
OUTSIDE = {TERMINATED, TIMED_OUT}


async def _closed(h: Harness, run: str) -> Any:
    desc = await h.client.get_workflow_handle(run).describe()
    return desc if desc.status != T.RUNNING else None


async def _says(h: Harness, run: str, status: AgentStatus) -> bool:
    return (await h.agents.status(run)).status == status


async def _details(h: Harness, run: str) -> str:
    handle = h.client.get_workflow_handle(run)
    meta = await handle.query("__temporal_workflow_metadata", result_type=WorkflowMetadata)
    return meta.current_details


async def _reset_to_first_task(h: Harness, run: str) -> str:
    """Reset the run to its first workflow task, as `temporal workflow reset` does; returns
    the new execution's run id (the old execution is terminated)."""
    handle = h.client.get_workflow_handle(run)
    first = next(
        e.event_id
        for e in (await handle.fetch_history()).events
        if e.event_type == EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED
    )
    was = (await handle.describe()).run_id
    reply = await h.client.workflow_service.reset_workflow_execution(
        ResetWorkflowExecutionRequest(
            namespace=h.client.namespace,
            workflow_execution=WorkflowExecution(workflow_id=run, run_id=was),
            reason="status truth test",
            workflow_task_finish_event_id=first,
            request_id=str(uuid.uuid4()),
        )
    )
    assert reply.run_id != was
    return reply.run_id


async def _listed(h: Harness, status: str | None) -> list[dict[str, Any]]:
    args = ["list", "--json"] + (["--status", status] if status else [])
    code, out, err = await keel(h, *args)
    assert code == 0, err
    return json.loads(out)


@pytest.mark.timeout(600)  # a run that outgrows Temporal's limits takes a while on a busy box
async def test_every_ending_and_stall_agrees_everywhere(harness: Harness) -> None:
    h = harness
    runs: dict[str, tuple[str, str]] = {}  # case -> (run id, the status every place says)
    async with h.running():
        # ends Keel controls
        runs["completed"] = (await h.start("calc", "say hello"), S.COMPLETED.value)
        runs["model error"] = (await h.start("calc", "trigger error"), S.FAILED.value)
        runs["empty replies"] = (await h.start("calc", "stay silent"), S.FAILED.value)
        runs["budget spent"] = (await h.start("steps", "loop forever"), S.BUDGET_EXHAUSTED.value)
        # 30 steps: several executions, one run
        runs["continued as new"] = (await h.start("long", "loop forever"), "budget_exhausted")
        runs["failed by size"] = (await h.start("long", "grow big"), S.FAILED.value)
        cancelled = await h.start("calc", "think slowly")
        runs["cancelled"] = (cancelled, S.CANCELLED.value)
        # stalls: open, and saying why
        runs["idle"] = (await h.start("chat", "say hello"), S.IDLE.value)
        runs["waiting approval"] = (await h.start("shop", "charge 30"), S.WAITING_APPROVAL.value)
        # ends from outside Keel
        terminated = await h.start("shop", "charge 30")
        runs["terminated"] = (terminated, TERMINATED)
        idle_terminated = await h.start("chat", "say hello")
        runs["terminated while idle"] = (idle_terminated, TERMINATED)
        timed_out = await h.start("shop", "charge 30", execution_timeout=timedelta(seconds=3))
        runs["timed out"] = (timed_out, TIMED_OUT)
        reset = await h.start("shop", "charge 30")
        runs["reset"] = (reset, S.WAITING_APPROVAL.value)

        await h.model.wait_held("slow")
        await h.agents.cancel(cancelled)
        await wait_for(lambda: _says(h, terminated, S.WAITING_APPROVAL))
        await h.client.get_workflow_handle(terminated).terminate("from outside Keel")
        await wait_for(lambda: _says(h, idle_terminated, S.IDLE))
        await h.client.get_workflow_handle(idle_terminated).terminate("from outside Keel")
        await wait_for(lambda: _says(h, reset, S.WAITING_APPROVAL))
        old_execution = (await h.client.get_workflow_handle(reset).describe()).run_id
        new_execution = await _reset_to_first_task(h, reset)
        await wait_for(lambda: _says(h, reset, S.WAITING_APPROVAL))

        for run, status in runs.values():
            if status in {s.value for s in (S.IDLE, S.WAITING_APPROVAL)}:
                await wait_for(lambda r=run, s=status: _says(h, r, AgentStatus(s)), timeout=60)
            else:
                await wait_for(lambda r=run: _closed(h, r), timeout=180)

        for case, (run, status) in runs.items():
            code, out, err = await keel(h, "status", run, "--json")
            assert json.loads(out)["status"] == status, (case, out, err)
            desc = await h.client.get_workflow_handle(run).describe()
            upserted = desc.typed_search_attributes.get(AGENT_STATUS) or ""
            assert run_status(upserted, desc.status) == status, case
            if status in OUTSIDE:
                continue  # the run never saw its end: Temporal's status is the record
            assert upserted == status, case
            details = await _details(h, run)
            assert details.startswith(f"**{status}**"), (case, details)

    # the reset's first execution is terminated, and is no run of its own
    old = await h.client.get_workflow_handle(reset, run_id=old_execution).describe()
    assert old.status == T.TERMINATED and new_execution != old_execution
    chain = [
        wf.status
        async for wf in h.client.list_workflows(f"WorkflowId = '{runs['continued as new'][0]}'")
    ]
    assert chain.count(T.CONTINUED_AS_NEW) >= 1 and len(chain) >= 2
    size_error = (await h.agents.summary(runs["failed by size"][0])).error
    assert "bytes" in size_error

    mine = {run: (case, status) for case, (run, status) in runs.items()}
    statuses = sorted({status for _, status in runs.values()} | {S.RUNNING.value})

    async def lists_agree() -> bool:
        every = [r for r in await _listed(h, None) if r["run_id"] in mine]
        if sorted(r["run_id"] for r in every) != sorted(mine):  # each run once
            return False
        if any(r["status"] != mine[r["run_id"]][1] for r in every):
            return False
        for status in statuses:
            rows = [r["run_id"] for r in await _listed(h, status) if r["run_id"] in mine]
            want = sorted(run for run, (_, s) in mine.items() if s == status)
            if sorted(rows) != want:  # one row each, and only runs that stand so
                return False
        return True

    # visibility is written after the fact: the lists agree once it has caught up
    await wait_for(lists_agree, timeout=60, every=1.0)
