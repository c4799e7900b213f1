"""Keel's side: the benchmark agent (and the same agent with an approval on its tool, and
with streaming off).

`LOCAL_TOOLS` says whether this build of Keel has `@tool(local=True)` (read-only tools run
as local activities); the "Keel, local read-only tools" variant is measured only then.
"""

from __future__ import annotations

import inspect

from pydantic import BaseModel

from bench.conversation import INSTRUCTIONS, MAX_STEPS, TOOL_DESCRIPTION, TOOL_NAME, add
from keel.activities.registry import Agent
from keel.activities.tools import Tool, ToolContext, tool
from keel.workflows.models import ApprovalMode, ApprovalPolicy, Limits, ModelSettings

AGENT = "bench"
APPROVAL_AGENT = "bench_approval"
WHOLE_AGENT = "bench_whole"  # asks for whole replies: `ModelSettings(stream=False)`
# every step of a K=300 conversation resends the transcript: its token count passes Keel's
# default budget long before the steps run out
LIMITS = Limits(max_steps=MAX_STEPS, max_tokens=10**10)


class AddArgs(BaseModel):
    a: int
    b: int


async def add_tool(args: AddArgs, ctx: ToolContext) -> str:
    return add(args.a, args.b)


LOCAL_TOOLS = "local" in inspect.signature(tool).parameters


def bench_tool(local: bool = False) -> Tool:
    options = {"local": True} if local else {}
    return tool(add_tool, name=TOOL_NAME, description=TOOL_DESCRIPTION, **options)


def agents(local: bool = False) -> list[Agent]:
    """What a Keel benchmark worker serves: the agent, the same agent with streaming off,
    and (with the tool run as an ordinary activity) the same agent with an approval on its
    tool. A local tool cannot wait for an approval, so the local variant serves no such agent."""
    t = bench_tool(local)
    served = [
        Agent(name=AGENT, instructions=INSTRUCTIONS, tools=[t], limits=LIMITS),
        Agent(
            name=WHOLE_AGENT,
            instructions=INSTRUCTIONS,
            tools=[t],
            limits=LIMITS,
            model=ModelSettings(stream=False),
        ),
    ]
    if not local:
        always = ApprovalPolicy(mode=ApprovalMode.ALWAYS, reason="benchmark")
        served.append(
            Agent(
                name=APPROVAL_AGENT,
                instructions=INSTRUCTIONS,
                tools=[t],
                limits=LIMITS,
                approvals={TOOL_NAME: always},
            )
        )
    return served
