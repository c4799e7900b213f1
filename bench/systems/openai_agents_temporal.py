"""Temporal's OpenAI Agents integration (`temporalio.openai_agents`, OpenAIAgentsPlugin).

The OpenAI Agents SDK's `Runner.run` inside a workflow: each model call is the plugin's
`invoke_model_activity`, the tool is a Temporal activity made into an agent tool with
`activity_as_tool`, as in Temporal's samples. The worker's model provider is the SDK's
`OpenAIProvider` on the Chat Completions API (the fake endpoint speaks no Responses API).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow

from bench.conversation import INSTRUCTIONS, MAX_STEPS, MODEL
from bench.conversation import add as count

with workflow.unsafe.imports_passed_through():
    from agents import Agent, Runner
    from temporalio.openai_agents.workflow import activity_as_tool

WORKFLOW = "bench.OpenAIAgents"
TOOL_TIMEOUT = timedelta(seconds=60)


@activity.defn(name="add")  # the agent's tool takes its name from the function's
async def add(a: int, b: int) -> str:
    """Add two integers."""
    return count(a, b)


@workflow.defn(name=WORKFLOW)
class OpenAIAgentsWorkflow:
    @workflow.run
    async def run(self, prompt: str) -> str:
        agent = Agent(
            name="bench",
            instructions=INSTRUCTIONS,
            model=MODEL,
            tools=[activity_as_tool(add, start_to_close_timeout=TOOL_TIMEOUT)],
        )
        result = await Runner.run(agent, prompt, max_turns=MAX_STEPS + 5)
        return str(result.final_output)


WORKFLOWS = [OpenAIAgentsWorkflow]
ACTIVITIES = [add]
