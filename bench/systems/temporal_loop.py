"""The hand-written Temporal loop: the least a Temporal user writes for an agent.

One workflow, a model activity and a tool activity per step (the openai client against the
fake endpoint, the tool function), the transcript as plain JSON dicts through Temporal's
default data converter, default worker options. No heartbeats, no continue-as-new, no
status publication, no policies. With `approval`, each tool call first waits for an
`approve` signal: the same work as a Keel approval, done by hand. `BareSignal` is the bare
signal round trip: a workflow that waits for a signal, then calls the model activity once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

from temporalio import activity, workflow
from temporalio.exceptions import ApplicationError

from bench.conversation import INSTRUCTIONS, MAX_STEPS, MODEL, TOOL_NAME, add, openai_tools

with workflow.unsafe.imports_passed_through():
    from openai import AsyncOpenAI

WORKFLOW = "bench.Loop"
BARE_WORKFLOW = "bench.BareSignal"
APPROVE = "approve"
GO = "go"
WAITING = "waiting"
MODEL_TIMEOUT = timedelta(seconds=60)
TOOL_TIMEOUT = timedelta(seconds=60)


@dataclass
class LoopInput:
    prompt: str
    approval: bool = False  # wait for an `approve` signal before each tool call


@dataclass
class ModelCall:
    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] = field(default_factory=openai_tools)


@dataclass
class ToolCall:
    name: str
    arguments: str


class LoopActivities:
    """The model call and the tool call, bound to one openai client."""

    def __init__(self, client: AsyncOpenAI) -> None:
        self.client = client

    @activity.defn(name="bench.call_model")
    async def call_model(self, call: ModelCall) -> dict[str, Any]:
        completion = await self.client.chat.completions.create(
            model=MODEL,
            messages=call.messages,  # type: ignore[arg-type]
            tools=call.tools,  # type: ignore[arg-type]
        )
        return completion.choices[0].message.model_dump(exclude_none=True)

    @activity.defn(name="bench.run_tool")
    async def run_tool(self, call: ToolCall) -> str:
        if call.name != TOOL_NAME:
            return f"Error: no tool named {call.name!r}"
        return add(**json.loads(call.arguments))


@workflow.defn(name=WORKFLOW)
class LoopWorkflow:
    def __init__(self) -> None:
        self.approvals = 0
        self.waiting = False

    @workflow.signal(name=APPROVE)
    def approve(self) -> None:
        self.approvals += 1

    @workflow.query(name=WAITING)
    def is_waiting(self) -> bool:
        return self.waiting

    @workflow.run
    async def run(self, input: LoopInput) -> str:
        messages: list[dict[str, Any]] = [
            {"role": "system", "content": INSTRUCTIONS},
            {"role": "user", "content": input.prompt},
        ]
        used = 0
        for _ in range(MAX_STEPS):
            reply = await workflow.execute_activity_method(
                LoopActivities.call_model, ModelCall(messages), start_to_close_timeout=MODEL_TIMEOUT
            )
            messages.append(reply)
            calls = reply.get("tool_calls") or []
            if not calls:
                return str(reply.get("content") or "")
            for call in calls:
                if input.approval:
                    self.waiting = True
                    await workflow.wait_condition(lambda n=used: self.approvals > n)
                    self.waiting = False
                    used += 1
                fn = call["function"]
                out = await workflow.execute_activity_method(
                    LoopActivities.run_tool,
                    ToolCall(fn["name"], fn["arguments"]),
                    start_to_close_timeout=TOOL_TIMEOUT,
                )
                messages.append({"role": "tool", "tool_call_id": call["id"], "content": out})
        raise ApplicationError("out of steps", non_retryable=True)


def after_one_tool_call(prompt: str) -> list[dict[str, Any]]:
    """A transcript one tool result into "count to K": the request a resumed run sends."""
    arguments = json.dumps({"a": 0, "b": 1})
    call = {
        "id": "call_0",
        "type": "function",
        "function": {"name": TOOL_NAME, "arguments": arguments},
    }
    return [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": prompt},
        {"role": "assistant", "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_0", "content": add(0, 1)},
    ]


@workflow.defn(name=BARE_WORKFLOW)
class BareSignalWorkflow:
    """Wait for the `go` signal, then call the model activity once."""

    def __init__(self) -> None:
        self.go = False

    @workflow.signal(name=GO)
    def signal_go(self) -> None:
        self.go = True

    @workflow.query(name=WAITING)
    def is_waiting(self) -> bool:
        return not self.go

    @workflow.run
    async def run(self, prompt: str) -> str:
        await workflow.wait_condition(lambda: self.go)
        reply = await workflow.execute_activity_method(
            LoopActivities.call_model,
            ModelCall(after_one_tool_call(prompt)),
            start_to_close_timeout=MODEL_TIMEOUT,
        )
        return str(reply.get("content") or reply.get("tool_calls"))


WORKFLOWS = [LoopWorkflow, BareSignalWorkflow]
