"""`keel demo`: a support conversation end to end, with a refund that needs approval."""

from __future__ import annotations

import asyncio
import sys
import textwrap

from keel.client.api import AgentClient
from keel.config import Settings
from keel.dev import DevStack
from keel.workflows.models import TERMINAL_STATUSES, AgentStatus, ApprovalRequest, RunState

APPROVER = "you"


def print_transcript(state: RunState) -> None:
    """The conversation as a person reads it."""
    for m in state.transcript:
        if m.role == "system":
            continue
        if m.role == "assistant" and m.tool_calls:
            for c in m.tool_calls:
                print(f"  agent  → {c.name}({c.arguments})")
            continue
        who = {"user": "user  ", "assistant": "agent ", "tool": "tool   ←"}[m.role]
        text = (m.content or "").replace("\n", " ")
        print(textwrap.fill(text, 100, initial_indent=f"  {who} ", subsequent_indent=" " * 11))


async def ask(prompt: str) -> str:
    """A line from the terminal, read in the event loop (no thread: one Ctrl-C stops)."""
    print(prompt, end="", flush=True)
    loop = asyncio.get_running_loop()
    line: asyncio.Future[str] = loop.create_future()

    def ready() -> None:
        if not line.done():
            line.set_result(sys.stdin.readline())

    loop.add_reader(sys.stdin.fileno(), ready)
    try:
        return (await line).strip().lower()
    finally:
        loop.remove_reader(sys.stdin.fileno())


async def ask_yes_no(prompt: str) -> bool:
    """y or n; anything else asks again, saying so."""
    while True:
        answer = await ask(prompt)
        if answer in ("y", "yes", "n", "no"):
            return answer.startswith("y")
        print("  Please answer y (approve) or n (reject).")


async def handle_approval(
    agents: AgentClient, run_id: str, req: ApprovalRequest, auto: bool
) -> None:
    """Show the request; approve it (auto), or ask the person at the terminal."""
    print(f"\nApproval needed: {req.tool}({req.arguments})")
    print(f"  why: {req.reason}; expires {req.expires_at:%Y-%m-%d %H:%M} UTC")
    print("  From another terminal:")
    print(f"    keel approve {run_id} {req.call_id} --as {APPROVER}")
    print(f"    keel reject  {run_id} {req.call_id} --as {APPROVER} --reason '...'")
    if auto:
        print(f"  Approving as {APPROVER} (--yes, or no terminal to ask on).")
        await agents.approve(run_id, req.call_id, APPROVER)
        return
    asking = asyncio.create_task(ask_yes_no("  Approve here? [y/n] "))
    while not asking.done():  # a decision from another terminal also ends the wait
        state = await agents.get_state(run_id)
        if all(r.call_id != req.call_id for r in state.pending_approvals):
            asking.cancel()
            await asyncio.gather(asking, return_exceptions=True)
            print("\n  Decided elsewhere.")
            return
        await asyncio.wait({asking}, timeout=0.5)
    if asking.result():
        await agents.approve(run_id, req.call_id, APPROVER)
    else:
        await agents.reject(run_id, req.call_id, APPROVER, "declined at the terminal")


async def run_demo(settings: Settings | None = None, *, yes: bool = False) -> int:
    """Run the support conversation on the embedded default; returns an exit code."""
    auto = yes or not sys.stdin.isatty()
    async with DevStack(settings) as stack:
        assert stack.client is not None
        agents = AgentClient(stack.client, stack.settings)
        order = await asyncio.to_thread(
            stack.ledger.new_order, "Dana Whitfield", "dana@example.com", "ceramic teapot", 42.5
        )
        before = {t: len(stack.ledger.rows(t)) for t in ("refunds", "outbox")}
        message = f"Hi, my order {order} arrived broken. Can I get a refund?"
        run_id = await agents.start("support", message, user="dana@example.com")
        print(f"\nRun {run_id} started: {message!r}")
        seen: set[str] = set()
        while True:
            state = await agents.get_state(run_id)
            for req in state.pending_approvals:
                if req.call_id not in seen:
                    seen.add(req.call_id)
                    await handle_approval(agents, run_id, req, auto)
            if state.status in TERMINAL_STATUSES:
                break
            await asyncio.sleep(0.3)
        print("\nTranscript:")
        print_transcript(state)
        print("\nLedger, new rows:")
        new = [
            (table, row)
            for table in ("refunds", "outbox")
            for row in stack.ledger.rows(table)[before[table] :]
        ]
        for table, row in new:
            shown = {k: v for k, v in row.items() if k != "body"}
            print(f"  {table}: {shown}")
        if not new:
            print("  (none: nothing was refunded or sent)")
        print(
            f"\nStatus: {state.status.value}, {state.step} model steps, "
            f"{state.usage.total_tokens} tokens"
        )
        print(f"Web UI: {stack.web_url(run_id)}")
        if stack.started_server:
            print("  (the run is kept in .keel/temporal.db: `keel dev` serves the Web UI again)")
        return 0 if state.status == AgentStatus.COMPLETED else 1
