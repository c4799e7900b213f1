"""What `keel mcp`'s tools answer: a pydantic model (the tool's output schema, sent as
structured content) and a few lines a person reads, in the words `keel` itself prints."""

from __future__ import annotations

import json
from typing import Any

from mcp.types import CallToolResult, TextContent
from pydantic import BaseModel, Field

from keel.activities.registry import Agent
from keel.client.api import PendingApproval, RunSummary
from keel.gateway.runs import RunView
from keel.workflows.authz import allowed_tools
from keel.workflows.models import (
    AgentResult,
    AgentStatus,
    ApprovalMode,
    ApprovalPolicy,
    DecideReceipt,
    MessagePolicy,
    MessageReceipt,
    Policy,
    TranscriptSlice,
)

ARGS_SHOWN = 200  # characters of a call's arguments in a line of text (the structure has all)


class ToolInfo(BaseModel):
    name: str
    description: str = ""
    side_effects: bool = False
    approval: str = "never"  # never, always, or the conditions that ask for one
    parameters: dict[str, Any] = Field(default_factory=dict)  # its JSON schema


class AgentInfo(BaseModel):
    name: str
    description: str = ""  # the first line of its instructions
    message_policy: MessagePolicy | None = None
    keeps_open: bool = False  # goes idle after a turn and takes the next message
    tools: list[ToolInfo] = Field(default_factory=list)


class Agents(BaseModel):
    agents: list[AgentInfo]
    note: str = ""


class Started(BaseModel):
    run_id: str
    agent: str
    user: str
    note: str = ""


class Waited(BaseModel):
    """Whether the run reached a point where it needs someone or has an answer."""

    reached: bool
    run: RunView


def reply(model: BaseModel, text: str) -> CallToolResult:
    """A tool's answer: `text` for a person, `model` as its structured content."""
    return CallToolResult(
        content=[TextContent(type="text", text=text)],
        structuredContent=model.model_dump(mode="json"),
    )


def approval_text(a: ApprovalPolicy) -> str:
    if a.mode != ApprovalMode.WHEN:
        return a.mode.value
    tests = " or ".join(f"{c.field} {c.op} {json.dumps(c.value)}" for c in a.when)
    return f"when {tests}" if tests else "never"


def agent_info(agent: Agent, policy: Policy | None) -> AgentInfo:
    """An agent as its runs will see it: the tools the policy lets it use."""
    spec = agent.spec()
    lines = (spec.instructions or "").strip().splitlines()
    return AgentInfo(
        name=spec.name,
        description=lines[0][:300] if lines else "",
        message_policy=spec.message_policy,
        keeps_open=spec.keep_open_seconds > 0,
        tools=[
            ToolInfo(
                name=t.name,
                description=t.description,
                side_effects=t.side_effects,
                approval=approval_text(t.approval),
                parameters=t.parameters,
            )
            for t in allowed_tools(policy, spec.name, spec.tools)
        ],
    )


def agents_text(found: Agents) -> str:
    lines = []
    for a in found.agents:
        tools = ", ".join(
            t.name + (f" (approval {t.approval})" if t.approval != "never" else "") for t in a.tools
        )
        about = f" — {a.description}" if a.description else ""
        lines.append(f"{a.name}{about}" + (f"\n  tools: {tools}" if tools else ""))
    if found.note:
        lines.append(found.note)
    return "\n".join(lines) or "no agents you may start"


def short(value: Any) -> str:
    text = json.dumps(value, default=str)
    return text if len(text) <= ARGS_SHOWN else text[:ARGS_SHOWN] + "…"


def run_text(view: RunView) -> str:
    """A RunView as `keel status` words it."""
    status = getattr(view.status, "value", view.status)
    lines = [
        f"run {view.run_id} ({view.agent}, for {view.user or 'anyone'}): {status}, "
        f"step {view.step}, {view.usage.total_tokens} tokens"
    ]
    for r in view.pending_approvals:
        lines.append(
            f"  waiting for approval: call {r.call_id} {r.tool}({short(r.arguments)}) — {r.reason}"
        )
    if view.error:
        lines.append(f"  error: {view.error}")
    return "\n".join(lines)


def runs_text(runs: list[RunSummary]) -> str:
    return (
        "\n".join(
            f"{r.run_id} {r.agent} {r.status or r.temporal_status} steps={r.steps} {r.user}"
            for r in runs
        )
        or "no runs"
    )


def transcript_text(page: TranscriptSlice) -> str:
    lines = []
    for m in page.messages:
        calls = "".join(f"\n    → {c.name}({c.arguments}) [{c.id}]" for c in m.tool_calls)
        who = f"tool {m.name} [{m.tool_call_id}]" if m.role == "tool" else m.role
        lines.append(f"{who}: {m.content or ''}{calls}")
    end = page.start + len(page.messages)
    if end < page.total:
        lines.append(
            f"-- messages {page.start}-{end} of {page.total}: the next page starts at {end}"
        )
    elif page.final_answer is not None:
        lines.append(f"-- answer: {page.final_answer}")
    return "\n".join(lines) or f"-- no messages from {page.start} (of {page.total})"


def pending_text(pending: list[PendingApproval]) -> str:
    lines = []
    for p in pending:
        if not p.reachable:
            lines.append(f"{p.run_id} (cannot be read now) — {p.reason}")
            continue
        lines.append(
            f"run {p.run_id} call {p.call_id}: {p.tool}({short(p.arguments)}) "
            f"— {p.reason} (waiting {p.age_seconds:.0f} s)"
        )
    return "\n".join(lines) or "no pending approvals"


def receipt_text(r: DecideReceipt) -> str:
    verb = {"approve": "approved", "edit": "approved with edits", "reject": "rejected"}
    text = f"{verb[r.decision.value]} call {r.call_id} as {r.approver}"
    if r.arguments is not None and r.decision.value != "reject":
        text += f"; it runs with {short(r.arguments)}"
    return text + (f"\n  {r.note}" if r.note else "")


def message_text(r: MessageReceipt) -> str:
    return f"{r.status} ({r.policy.value})" + (f": {r.reason}" if r.reason else "")


def result_text(run_id: str, r: AgentResult) -> str:
    if r.status in (AgentStatus.COMPLETED, AgentStatus.IDLE):
        return r.final_answer or f"run {run_id} {r.status.value} with no answer"
    said = f"\nlast answer: {r.final_answer}" if r.final_answer else ""
    return f"run {run_id} ended {r.status.value}: {r.error or 'no reason given'}{said}"
