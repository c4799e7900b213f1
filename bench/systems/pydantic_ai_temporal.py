"""Pydantic AI on Temporal (`pydantic_ai.durable_exec.temporal`).

A Pydantic AI `Agent` with the `TemporalDurability` capability, run from a workflow listed
in `__pydantic_ai_agents__` and served with `PydanticAIPlugin`: each model request is an
activity, and so is each call of the function tool (Pydantic AI's defaults). The model is
`OpenAIChatModel` on an `AsyncOpenAI(max_retries=0)` client for the fake endpoint, whose
URL the worker finds in BENCH_MODEL_URL when it imports this module.
"""

from __future__ import annotations

import os

from temporalio import workflow

from bench.conversation import INSTRUCTIONS, MAX_STEPS, MODEL
from bench.conversation import add as count

with workflow.unsafe.imports_passed_through():
    from openai import AsyncOpenAI
    from pydantic_ai import Agent, Tool, UsageLimits
    from pydantic_ai.durable_exec.temporal import PydanticAIWorkflow, TemporalDurability
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

WORKFLOW = "bench.PydanticAI"
MODEL_URL_ENV = "BENCH_MODEL_URL"


async def add(a: int, b: int) -> str:
    """Add two integers."""
    return count(a, b)


def make_agent(base_url: str) -> Agent[None, str]:
    client = AsyncOpenAI(base_url=base_url, api_key="not-needed", max_retries=0)
    model = OpenAIChatModel(MODEL, provider=OpenAIProvider(openai_client=client))
    return Agent(
        model,
        name="bench",
        instructions=INSTRUCTIONS,
        tools=[Tool(add)],
        capabilities=[TemporalDurability()],
    )


AGENT = make_agent(os.environ.get(MODEL_URL_ENV, "http://127.0.0.1:9/v1"))


@workflow.defn(name=WORKFLOW)
class PydanticAIBenchWorkflow(PydanticAIWorkflow):
    __pydantic_ai_agents__ = [AGENT]

    @workflow.run
    async def run(self, prompt: str) -> str:
        limits = UsageLimits(request_limit=MAX_STEPS + 5, tool_calls_limit=MAX_STEPS + 5)
        result = await AGENT.run(prompt, usage_limits=limits)
        return result.output


WORKFLOWS = [PydanticAIBenchWorkflow]
