"""Agents and tools the tests run: small, each showing one behaviour."""

from __future__ import annotations

import asyncio
import json
import os

from pydantic import BaseModel, Field
from temporalio import activity

from keel.activities.registry import Agent
from keel.activities.tools import ToolContext, tool
from keel.demo.agent import Ledger
from keel.workflows.models import (
    ApprovalMode,
    ApprovalPolicy,
    ApprovalTimeoutAction,
    Condition,
    Limits,
    MessagePolicy,
    ModelSettings,
)


class AddArgs(BaseModel):
    a: int
    b: int


class ChargeArgs(BaseModel):
    amount: float = Field(gt=0)
    note: str = ""


class WaitArgs(BaseModel):
    seconds: float = 5.0


@tool
async def add(args: AddArgs, ctx: ToolContext) -> str:
    """Add two integers."""
    return json.dumps({"result": args.a + args.b})


@tool(side_effects=True)
async def charge(args: ChargeArgs, ctx: ToolContext) -> str:
    """Refund an amount on order A-1002 (a side effect, keyed by the idempotency key)."""
    ledger: Ledger = ctx.resources
    r = await asyncio.to_thread(
        ledger.refund, "A-1002", args.amount, args.note, ctx.idempotency_key
    )
    return json.dumps(r)


@tool(heartbeat_seconds=3, timeout_seconds=120)
async def slow_lookup(args: WaitArgs, ctx: ToolContext) -> str:
    """A read that takes a while (interruptible)."""
    await asyncio.sleep(args.seconds)
    return json.dumps({"looked_up": True})


@tool(side_effects=True, heartbeat_seconds=3, timeout_seconds=120)
async def slow_email(args: WaitArgs, ctx: ToolContext) -> str:
    """A side effect that takes a while: once started, it finishes."""
    await asyncio.sleep(args.seconds)
    ledger: Ledger = ctx.resources
    r = await asyncio.to_thread(
        ledger.email, "ops@example.com", "slow", "done", ctx.idempotency_key
    )
    return json.dumps(r)


@tool(initial_retry_seconds=0.2)
async def flaky(args: WaitArgs, ctx: ToolContext) -> str:
    """Fails on its first two attempts, then works."""
    if activity.info().attempt < 3:
        raise RuntimeError(f"transient failure on attempt {activity.info().attempt}")
    return json.dumps({"result": activity.info().attempt})


@tool(timeout_seconds=120)
async def nap(args: WaitArgs, ctx: ToolContext) -> str:
    """A long tool that never heartbeats itself: the first attempt notes that it started,
    then sleeps; later attempts answer at once."""
    if activity.info().attempt == 1:
        ledger: Ledger = ctx.resources
        await asyncio.to_thread(ledger.email, "nap@example.com", "nap", "started", "nap-started")
        await asyncio.sleep(args.seconds)
    return json.dumps({"napped": activity.info().attempt})


@tool(timeout_seconds=300)
async def held(args: WaitArgs, ctx: ToolContext) -> str:
    """Notes each attempt in the ledger, then waits until the test opens its gate (a file
    named `gate` beside the ledger)."""
    ledger: Ledger = ctx.resources
    attempt = activity.info().attempt
    await asyncio.to_thread(
        ledger.email, "held@example.com", "held", f"attempt {attempt}", f"held-{attempt}"
    )
    while not (ledger.path.parent / "gate").exists():
        await asyncio.sleep(0.05)
    return json.dumps({"attempt": attempt})


def ledger_from_env() -> Ledger:
    """The resources of a `keel worker` a test starts: the ledger KEEL_TEST_LEDGER names."""
    return Ledger(os.environ["KEEL_TEST_LEDGER"])


class BlobArgs(BaseModel):
    size: int


@tool
async def blob(args: BlobArgs, ctx: ToolContext) -> str:
    """Return a large result."""
    return "x" * args.size


CHARGE_APPROVAL = ApprovalPolicy(
    mode=ApprovalMode.WHEN,
    when=[Condition(field="amount", op=">", value=20)],
    approvers=["alice", "bob"],
    reason="charges above 20 need approval",
)
CHARGE = {"charge": CHARGE_APPROVAL}
FAST = ModelSettings(timeout_seconds=2.0, max_attempts=6)
# quick retries and short waits, so an outage shows within a test
PATIENT = ModelSettings(
    timeout_seconds=2.0, max_attempts=2, retry_initial_seconds=0.2, retry_max_seconds=0.5
)
FALLING_BACK = PATIENT.model_copy(
    update={"model": "primary", "fallbacks": [PATIENT.model_copy(update={"model": "backup"})]}
)
TOOLS = [add, charge, slow_lookup, slow_email, flaky, blob, nap]
INSTRUCTIONS = "You are a test agent."

CALC = Agent(name="calc", instructions=INSTRUCTIONS, tools=TOOLS)
SHOP = Agent(name="shop", instructions=INSTRUCTIONS, tools=TOOLS, approvals=CHARGE)
# sub-agents: each call runs the child agent as a child workflow
BOSS = Agent(
    name="boss",
    instructions="You delegate.",
    tools=[add, SHOP.as_tool("ask_shop", side_effects=True), CALC.as_tool("ask_calc")],
)

# who may approve is left to the worker's policy (tests/test_signed_decisions.py and others)
GUARDED_CHARGE = {
    "charge": ApprovalPolicy(
        mode=ApprovalMode.WHEN,
        when=[Condition(field="amount", op=">", value=20)],
        reason="charges above 20 need approval",
    )
}

TEST_AGENTS = [
    CALC,
    Agent(name="guarded", instructions=INSTRUCTIONS, tools=TOOLS, approvals=GUARDED_CHARGE),
    Agent(
        name="guarded-open",
        instructions=INSTRUCTIONS,
        tools=TOOLS,
        approvals=GUARDED_CHARGE,
        keep_open_seconds=600,
        limits=Limits(max_steps=200, max_tokens=10**9),
    ),
    Agent(name="adder", instructions=INSTRUCTIONS, tools=[add]),
    Agent(name="fast", instructions=INSTRUCTIONS, tools=TOOLS, model=FAST),
    # one step only: an outage on the last allowed step must wait, not spend the budget
    Agent(
        name="patient",
        instructions=INSTRUCTIONS,
        tools=TOOLS,
        model=PATIENT,
        limits=Limits(max_steps=1),
    ),
    Agent(name="falling-back", instructions=INSTRUCTIONS, tools=TOOLS, model=FALLING_BACK),
    SHOP,
    BOSS,
    Agent(
        name="shop-open",
        instructions=INSTRUCTIONS,
        tools=TOOLS,
        approvals=CHARGE,
        keep_open_seconds=3 * 24 * 3600,
    ),
    Agent(
        name="shop-strict",
        instructions=INSTRUCTIONS,
        tools=TOOLS,
        approvals=CHARGE,
        approval_timeout_seconds=3600,
        on_approval_timeout=ApprovalTimeoutAction.CANCEL,
    ),
    Agent(
        name="long",
        instructions=INSTRUCTIONS,
        tools=TOOLS,
        limits=Limits(max_steps=30, max_tokens=10**9),
    ),
    Agent(name="holder", instructions=INSTRUCTIONS, tools=[held]),
    Agent(name="six", instructions=INSTRUCTIONS, tools=TOOLS, limits=Limits(max_steps=6)),
    Agent(name="steps", instructions=INSTRUCTIONS, tools=TOOLS, limits=Limits(max_steps=3)),
    Agent(name="tokens", instructions=INSTRUCTIONS, tools=TOOLS, limits=Limits(max_tokens=150)),
    Agent(name="clock", instructions=INSTRUCTIONS, tools=TOOLS, limits=Limits(max_seconds=2)),
    Agent(name="chat", instructions=INSTRUCTIONS, tools=TOOLS, keep_open_seconds=600),
    Agent(
        name="chat-long",
        instructions=INSTRUCTIONS,
        tools=TOOLS,
        keep_open_seconds=600,
        limits=Limits(max_steps=500, max_tokens=10**9),
    ),
    Agent(
        name="strict-chat",
        instructions=INSTRUCTIONS,
        tools=TOOLS,
        message_policy=MessagePolicy.REJECT,
    ),
]
