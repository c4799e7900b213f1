"""Record histories for the replay test: `python -m tests.record_histories`.

Run it when a change to the workflow is intended to alter the commands it issues (after
guarding the change with `workflow.patched`), and commit the new files beside the old ones.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from keel.activities.support import Ledger
from keel.client.model_server import RuleSet, ScriptedModelServer
from keel.workflows.models import SEARCH_ATTRIBUTES
from tests.conftest import Harness, binary, wait_for

HERE = Path(__file__).parent / "histories"


async def scenario(h: Harness, name: str, agent: str, text: str, tag: str) -> None:
    async with h.running():
        # the id is part of what replays (a sub-agent's run id derives from it)
        run = await h.agents.start(agent, text, user="tester", run_id=f"history-{name}{tag}")
        if name == "approve":
            state = await wait_for(lambda: _pending(h, run))
            await h.agents.approve(run, state.pending_approvals[0].call_id, "alice")
        if name == "subagent":
            child = await wait_for(lambda: _child_pending(h, run))
            await h.agents.approve(child.run_id, child.call_id, "alice")
        if name == "idle":
            await h.agents.result(run, timeout=60)
            await h.client.get_workflow_handle(run).signal("keel.submit_message", {"text": "echo"})
            await h.client.get_workflow_handle(run).signal("keel.submit_message", "not json {")
            await wait_for(lambda: _turns(h, run, 2))
            await h.agents.cancel(run)
        if name in ("interrupt", "rollback"):
            await wait_for(lambda: _tools_running(h, run))
            await h.agents.send_message(run, "say hello", name)
        await h.agents.result(run, timeout=120)
    history = await h.client.get_workflow_handle(run).fetch_history()
    (HERE / f"{name}{tag}.json").write_text(history.to_json())
    print(f"recorded {name}: {len(history.events)} events")


async def _pending(h: Harness, run: str) -> object:
    s = await h.agents.get_state(run)
    return s if s.pending_approvals else None


async def _child_pending(h: Harness, run: str) -> object:
    return next((p for p in await h.agents.pending() if p.run_id.startswith(run + ".")), None)


async def _turns(h: Harness, run: str, n: int) -> object:
    s = await h.agents.get_state(run)
    return s if s.turn >= n and s.status.value == "idle" else None


async def _tools_running(h: Harness, run: str) -> object:
    s = await h.agents.get_state(run)
    return s if s.transcript and s.transcript[-1].tool_calls else None


async def main() -> None:
    """Record; `--tag X` writes `NAME-X.json` beside the older recordings instead of over them."""
    import argparse

    from tests.rules import TEST_RULES

    p = argparse.ArgumentParser()
    p.add_argument("--tag", default="")
    tag = f"-{t}" if (t := p.parse_args().tag) else ""

    HERE.mkdir(exist_ok=True)
    async with await WorkflowEnvironment.start_local(
        dev_server_existing_path=binary("temporal"),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
    ) as env:
        for name, agent, text in [
            ("tools", "calc", "add 2 and 3"),
            ("approve", "shop", "charge 30"),
            ("interrupt", "calc", "use slow tools"),
            ("rollback", "calc", "use slow tools"),
            ("budget", "steps", "loop forever"),
            ("idle", "chat", "say hello"),
            ("subagent", "boss", "delegate charge 30"),
        ]:
            with ScriptedModelServer(RuleSet.from_dict(TEST_RULES)) as model:
                ledger = Ledger(Path(tempfile.mkdtemp()) / "ledger.db")
                await scenario(Harness(env, model, ledger), name, agent, text, tag)


if __name__ == "__main__":
    asyncio.run(main())
