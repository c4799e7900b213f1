"""The helpdesk's tools and agents: all a team writes to put agents on Keel.

Serve them with Keel's own worker:
    keel worker --agents examples.helpdesk.agents:AGENTS --resources examples.helpdesk.agents:desk
or from the team's own worker beside its own workflows (worker.py here).
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
from pathlib import Path

from pydantic import BaseModel, Field

from keel import Agent, ApprovalMode, ApprovalPolicy, Condition, Limits, ToolContext, tool

ARTICLES = {
    "boot": "Laptop will not boot: hold the power button for 15 s, then start with F8.",
    "vpn": "VPN down: check the status page, then open an urgent ticket.",
    "printer": "Printer jammed: open tray 2 and pull the sheet out gently.",
}


class TicketDesk:
    """The system the agents change: tickets in a SQLite file, one per idempotency key."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        with sqlite3.connect(self.path) as db:
            db.execute(
                "CREATE TABLE IF NOT EXISTS tickets (ticket_id TEXT PRIMARY KEY, title TEXT, "
                "priority TEXT, idempotency_key TEXT UNIQUE NOT NULL)"
            )

    def open(self, title: str, priority: str, key: str) -> dict[str, str]:
        """Open a ticket once per key; a retried call gets the first ticket back."""
        with sqlite3.connect(self.path, isolation_level=None) as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute(
                "SELECT ticket_id, title, priority FROM tickets WHERE idempotency_key = ?", (key,)
            ).fetchone()
            if row is None:
                n = db.execute("SELECT COUNT(*) FROM tickets").fetchone()[0]
                row = (f"T-{n + 1:04d}", title, priority)
                db.execute("INSERT INTO tickets VALUES (?, ?, ?, ?)", (*row, key))
            db.execute("COMMIT")
        return {"ticket_id": row[0], "title": row[1], "priority": row[2]}

    def count(self) -> int:
        with sqlite3.connect(self.path) as db:
            return int(db.execute("SELECT COUNT(*) FROM tickets").fetchone()[0])


def desk() -> TicketDesk:
    """The resources the tools get (`ctx.resources`): built once, by the worker."""
    return TicketDesk(os.environ.get("HELPDESK_DB", "helpdesk.db"))


class Search(BaseModel):
    query: str = Field(description="What to look for, in a few words")


class NewTicket(BaseModel):
    title: str = Field(description="The problem, in one line")
    priority: str = Field(default="normal", pattern="^(low|normal|urgent)$")


@tool
async def search_kb(args: Search, ctx: ToolContext) -> str:
    """Search the helpdesk knowledge base."""
    hits = [text for key, text in ARTICLES.items() if key in args.query.lower()]
    return json.dumps({"title": hits[0] if hits else "no article found", "hits": len(hits)})


@tool(side_effects=True, max_attempts=10)
async def open_ticket(args: NewTicket, ctx: ToolContext) -> str:
    """Open a helpdesk ticket."""
    d: TicketDesk = ctx.resources
    ticket = await asyncio.to_thread(d.open, args.title, args.priority, ctx.idempotency_key)
    return json.dumps(ticket)


TRIAGE = Agent(
    name="triage",
    instructions="You triage IT problems: open a ticket with the right priority.",
    tools=[search_kb, open_ticket],
    approvals={
        "open_ticket": ApprovalPolicy(
            mode=ApprovalMode.WHEN,
            when=[Condition(field="priority", op="==", value="urgent")],
            approvers=["lead"],
            reason="urgent tickets page the on-call engineer",
        )
    },
    limits=Limits(max_steps=6),
)

PLANNER = Agent(
    name="planner",
    instructions="You help employees with IT problems: plan, then carry the plan out.",
    tools=[search_kb, TRIAGE.as_tool("ask_triage", "Ask the triage agent to open a ticket.")],
    limits=Limits(max_steps=12),
)

AGENTS = [PLANNER, TRIAGE]
