"""Record histories for the replay test: `python -m tests.record_histories [--only NAME ...]`.

Run it when a change to the workflow is intended to alter the commands it issues (after
guarding the change with `workflow.patched`), and commit the new files beside the old ones.
The run id is part of what replays (a sub-agent's run id derives from it), so each is
recorded as `history-<name>`; payloads stored outside the history go to
`histories/payloads/`, which is committed with them.
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
from pathlib import Path

from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from examples.helpdesk.agents import AGENTS as HELPDESK_AGENTS
from examples.helpdesk.agents import TicketDesk
from examples.helpdesk.workflows import PlanAndExecute
from keel.client.api import AgentClient
from keel.config import Settings
from keel.demo.agent import Ledger
from keel.dev import dev_server_args
from keel.plugin import ModelProvider, build_worker
from keel.testing.model_server import RuleSet, ScriptedModelServer
from keel.workflows.models import SEARCH_ATTRIBUTES, EventKind
from tests.conftest import Harness, binary, wait_for
from tests.rules import TEST_RULES

HERE = Path(__file__).parent / "histories"
PAYLOADS = HERE / "payloads"
HELPDESK_RULES = Path(__file__).parent.parent / "examples" / "helpdesk" / "scripted_model.json"

# name, agent, first message
SCENARIOS = [
    ("tools", "calc", "add 2 and 3"),
    ("approve", "shop", "charge 30"),
    ("edit", "shop", "charge 30"),
    ("reject", "shop", "charge 30"),
    ("interrupt", "calc", "use slow tools"),
    ("rollback", "calc", "use slow tools"),
    ("cancel", "calc", "use slow tools"),
    ("budget", "steps", "loop forever"),
    ("idle", "chat", "say hello"),
    ("subagent", "boss", "delegate charge 30"),
    ("provider", "patient", "say hello"),
    ("fallback", "falling-back", "add 1 and 1 (one)"),
    ("continue-as-new", "long", "loop forever"),
    ("stored", "calc", "add 2 and 3"),
    ("stored-ref", "six", "loop forever"),  # model requests refer to the stored conversation
    ("plan", "planner", "My laptop will not boot and the VPN is down"),
    ("parked", "shop", "charge twice"),
    ("expiry", "shop-brief", "charge 30"),  # no decision: the approval expires (1 s)
    ("streamed", "calc", "tell a story"),  # the reply's pieces reach the run as signals
    ("mcp", "timekeeper", "what time is it?"),  # an MCP server's tools listed, pinned and called
]


def history_id(name: str) -> str:
    """The workflow id a recorded history ran under."""
    return f"history-{name}"


async def scenario(h: Harness, name: str, agent: str, text: str) -> None:
    run = history_id(name)
    loop = PlanAndExecute if name == "plan" else None
    if name == "provider":
        h.model.set_faults([{"kind": "500", "count": 10_000}])
    if name == "fallback":
        h.model.set_faults([{"kind": "503", "count": 10_000, "when": {"model": "^primary$"}}])
    extra = [PlanAndExecute] if loop else []
    agents = HELPDESK_AGENTS if loop else None
    worker = build_worker(
        h.client,
        settings=h.settings,
        agents=agents or _test_agents(),
        resources=TicketDesk(Path(tempfile.mkdtemp()) / "d.db") if loop else h.ledger,
        model=ModelProvider(base_url=h.model.url, model="scripted"),
        workflows=extra,
    )
    async with worker:
        if loop:
            await h.agents.start(agent, text, user="tester", run_id=run, loop=loop)
        else:
            await h.agents.start(agent, text, user="tester", run_id=run)
        if name in ("approve", "edit", "reject"):
            state = await wait_for(lambda: _pending(h, run))
            call_id = state.pending_approvals[0].call_id
            if name == "approve":
                await h.agents.approve(run, call_id, "alice")
            elif name == "edit":
                await h.agents.approve(run, call_id, "alice", edit={"amount": 25})
            else:
                await h.agents.reject(run, call_id, "alice", "too much")
        if name in ("subagent", "plan"):
            child = await wait_for(lambda: _child_pending(h, run))
            await h.agents.approve(child.run_id, child.call_id, child.approvers[0])
        if name == "idle":
            await h.agents.result(run, timeout=60)
            await h.client.get_workflow_handle(run).signal("keel.submit_message", {"text": "echo"})
            await h.client.get_workflow_handle(run).signal("keel.submit_message", "not json {")
            await wait_for(lambda: _turns(h, run, 2))
            await h.agents.cancel(run)
        if name in ("interrupt", "rollback"):
            await wait_for(lambda: _tools_running(h, run))
            await h.agents.send_message(run, "say hello", name)
        if name == "streamed":  # held mid-reply until a piece of it has reached the run
            await h.model.wait_held("story")
            await wait_for(lambda: _delta(h, run))
            h.model.release("story")
        if name == "cancel":
            await wait_for(lambda: _tools_running(h, run))
            await h.agents.cancel(run)
        if name == "provider":
            await wait_for(lambda: _status(h, run, "waiting_provider"))
            h.model.set_faults([])
        if name == "parked":  # refused signals until the parked run moves to a new history
            state = await wait_for(lambda: _pending(h, run))
            handle = h.client.get_workflow_handle(run)
            started = (await handle.describe()).run_id
            for i in range(400):
                await handle.signal("keel.decide", f"garbage {i}")
                if i % 5 == 4 and (await handle.describe()).run_id != started:
                    break
            call_id = state.pending_approvals[0].call_id
            await h.agents.approve(run, call_id, "alice")
        await h.agents.result(run, timeout=120)
        first = (await h.client.get_workflow_handle(run).describe()).run_id
    # continue-as-new: the first history of the chain, which ends in the new one
    handle = h.client.get_workflow_handle(run)
    if name == "continue-as-new":
        runs = [w async for w in h.client.list_workflows(f"WorkflowId = '{run}'")]
        first = min(runs, key=lambda w: w.start_time).run_id
        handle = h.client.get_workflow_handle(run, run_id=first)
    if name == "parked":  # the parked history, and the one that takes the step up
        runs = [w async for w in h.client.list_workflows(f"WorkflowId = '{run}'")]
        first = min(runs, key=lambda w: w.start_time).run_id
        resumed = await h.client.get_workflow_handle(run).fetch_history()
        (HERE / f"{name}.resumed.json").write_text(resumed.to_json())
        handle = h.client.get_workflow_handle(run, run_id=first)
    history = await handle.fetch_history()
    (HERE / f"{name}.json").write_text(history.to_json())
    print(f"recorded {name}: {len(history.events)} events")


def _test_agents() -> list:  # type: ignore[type-arg]
    from keel.activities.registry import Agent
    from tests.agents import CHARGE, INSTRUCTIONS, TEST_AGENTS, TOOLS
    from tests.mcp_servers.agents import CLOCK

    brief = Agent(
        name="shop-brief",
        instructions=INSTRUCTIONS,
        tools=TOOLS,
        approvals=CHARGE,
        approval_timeout_seconds=1,
    )
    return [*TEST_AGENTS, brief, CLOCK]


async def _pending(h: Harness, run: str) -> object:
    s = await h.agents.get_state(run)
    return s if s.pending_approvals else None


async def _status(h: Harness, run: str, status: str) -> object:
    s = await h.agents.get_state(run)
    return s if s.status.value == status else None


async def _child_pending(h: Harness, run: str) -> object:
    return next((p for p in await h.agents.pending() if p.run_id.startswith(run + ".")), None)


async def _turns(h: Harness, run: str, n: int) -> object:
    s = await h.agents.get_state(run)
    return s if s.turn >= n and s.status.value == "idle" else None


async def _delta(h: Harness, run: str) -> object:
    async for _, e in h.agents.events(run, follow=False):
        if e.kind == EventKind.MODEL_DELTA:
            return e
    return None


async def _tools_running(h: Harness, run: str) -> object:
    s = await h.agents.get_state(run)
    return s if s.transcript and s.transcript[-1].tool_calls else None


async def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--only", nargs="*", default=None, help="scenario names (default: all)")
    only = p.parse_args().only
    HERE.mkdir(exist_ok=True)
    async with await WorkflowEnvironment.start_local(
        dev_server_existing_path=binary("temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
        dev_server_extra_args=[
            "--dynamic-config-value",
            "limit.historyCount.suggestContinueAsNew=60",
            *dev_server_args(file_backed=False),
        ],
    ) as env:
        for name, agent, text in SCENARIOS:
            if only and name not in only:
                continue
            rules = (
                RuleSet.load(HELPDESK_RULES) if name == "plan" else RuleSet.from_dict(TEST_RULES)
            )
            if name == "mcp":
                from tests.mcp_servers.agents import MCP_RULES

                rules = RuleSet.from_dict(MCP_RULES)
            with ScriptedModelServer(rules) as model:
                ledger = Ledger(Path(tempfile.mkdtemp()) / "ledger.db")
                h = Harness(env, model, ledger)
                if name in ("stored", "stored-ref"):
                    # a history whose payloads live outside it (KEEL_PAYLOAD_DIR)
                    h.settings = Settings(
                        task_queue=h.settings.task_queue,
                        payload_dir=str(PAYLOADS),
                        payload_threshold=256,
                    )
                    h.client = await Client.connect(
                        env.client.service_client.config.target_host,
                        data_converter=h.settings.data_converter(),
                    )
                    h.agents = AgentClient(h.client, h.settings)
                await scenario(h, name, agent, text)


if __name__ == "__main__":
    asyncio.run(main())
