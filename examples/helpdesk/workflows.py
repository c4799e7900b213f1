"""The helpdesk's workflows: a plan-and-execute agent loop built from Keel's blocks, and a
plain Temporal workflow of the team's own beside it."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

from keel.workflows import KeelWorkflow
from keel.workflows.models import AgentInput, AgentResult, AgentSpec, AgentStatus

PLAN = "Make a plan: list the steps, one per line, each starting with '- '."
SUMMARY = "Summarise for the user what was done."


@workflow.defn(name="helpdesk.PlanAndExecute")
class PlanAndExecute(KeelWorkflow):
    """Plan first (no tools offered), then one turn per plan step, then a summary.

    Every guarantee of Keel's default loop holds: approvals, messages and interrupts,
    budgets, idempotent tools, sub-agents, continue-as-new (the plan's progress lives in
    `state.loop_state`, which is carried into the next history)."""

    @workflow.run
    async def run(self, input: AgentInput) -> AgentResult:
        return await self.execute(input, self.plan_and_execute)

    async def plan_and_execute(self, spec: AgentSpec) -> AgentResult:
        progress = self.state.loop_state
        if "phase" not in progress:
            self.deliver()  # the user's request comes before the planning instruction
            self.say(PLAN)
            progress["phase"] = "planning"
        if progress["phase"] == "planning":
            plan = await self.turn(tools=[])
            progress.update(phase="executing", plan=parse_plan(plan), done=0, asked=False)
        while progress["done"] < len(progress["plan"]):
            if not progress["asked"]:
                n = progress["done"]
                self.say(f"Step {n + 1} of the plan: {progress['plan'][n]}")
                progress["asked"] = True
            await self.turn()
            progress.update(done=progress["done"] + 1, asked=False)
        if progress["phase"] == "executing":
            self.say(SUMMARY)
            progress["phase"] = "summarising"
        await self.turn(tools=[])
        return self.finish(AgentStatus.COMPLETED)


def parse_plan(text: str) -> list[str]:
    """The steps of a plan written as a '- ' list (at most ten)."""
    steps = [line[2:].strip() for line in text.splitlines() if line.startswith("- ")]
    return [s for s in steps if s][:10]


@workflow.defn(name="helpdesk.TicketReport")
class TicketReport:
    """A workflow of the team's own, served by the same worker as the agents."""

    @workflow.run
    async def run(self) -> int:
        return await workflow.execute_activity(
            "helpdesk.count_tickets",
            result_type=int,
            start_to_close_timeout=timedelta(seconds=30),
            summary="count tickets",
        )
