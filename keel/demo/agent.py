"""The demo's support agent, over a real SQLite ledger of orders, refunds and e-mails.

Served by `keel dev` and `keel demo`, or when asked for:
`keel worker --agents keel.demo.agent:AGENTS --resources keel.demo.agent:ledger`.

`issue_refund` and `send_email` are side-effecting: each write is keyed by the call's
idempotency key, so a retried or replayed call returns the first result and never pays twice.
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from keel.activities.registry import Agent
from keel.activities.tools import ToolContext, tool
from keel.workflows.models import ApprovalMode, ApprovalPolicy, Condition, Limits

SCHEMA = """
CREATE TABLE IF NOT EXISTS orders (
    order_id TEXT PRIMARY KEY, customer TEXT, email TEXT, item TEXT,
    total REAL NOT NULL, status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS refunds (
    refund_id TEXT PRIMARY KEY, order_id TEXT NOT NULL REFERENCES orders(order_id),
    amount REAL NOT NULL, reason TEXT, idempotency_key TEXT NOT NULL UNIQUE, created_at TEXT
);
CREATE TABLE IF NOT EXISTS outbox (
    email_id TEXT PRIMARY KEY, to_addr TEXT NOT NULL, subject TEXT, body TEXT,
    idempotency_key TEXT NOT NULL UNIQUE, created_at TEXT
);
"""

SEED_ORDERS = [
    ("A-1001", "Dana Whitfield", "dana@example.com", "ceramic teapot", 42.50, "delivered"),
    ("A-1002", "Sam Okafor", "sam@example.com", "standing desk", 389.00, "shipped"),
    ("A-1003", "Lee Moreau", "lee@example.com", "desk lamp", 18.99, "delivered"),
]


class Ledger:
    """The business system the support agent changes: a SQLite file."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.executescript(SCHEMA)
            db.executemany("INSERT OR IGNORE INTO orders VALUES (?, ?, ?, ?, ?, ?)", SEED_ORDERS)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    def order(self, order_id: str) -> dict[str, Any] | None:
        """One order with what has been refunded on it."""
        with self._db() as db:
            row = db.execute("SELECT * FROM orders WHERE order_id = ?", (order_id,)).fetchone()
            if row is None:
                return None
            refunded = db.execute(
                "SELECT COALESCE(SUM(amount), 0) FROM refunds WHERE order_id = ?", (order_id,)
            ).fetchone()[0]
        order = {**dict(row), "refunded": round(refunded, 2)}
        if refunded >= row["total"] - 1e-9:
            order["status"] = "refunded"
        return order

    def new_order(self, customer: str, email: str, item: str, total: float) -> str:
        """Add an order (the demo makes a fresh one each time); returns its id."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            n = db.execute("SELECT COUNT(*) FROM orders").fetchone()[0]
            order_id = f"A-{1001 + n}"
            db.execute(
                "INSERT INTO orders VALUES (?, ?, ?, ?, ?, ?)",
                (order_id, customer, email, item, total, "delivered"),
            )
            db.execute("COMMIT")
        return order_id

    def refund(self, order_id: str, amount: float, reason: str, key: str) -> dict[str, Any]:
        """Record a refund once per idempotency key; a repeat returns the first one."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                row = db.execute("SELECT * FROM refunds WHERE idempotency_key = ?", (key,))
                first = row.fetchone()
                if first is not None:
                    db.execute("COMMIT")
                    return {**dict(first), "status": "refunded", "repeat": True}
                order = db.execute(
                    "SELECT total FROM orders WHERE order_id = ?", (order_id,)
                ).fetchone()
                if order is None:
                    db.execute("ROLLBACK")
                    return {"error": f"no order {order_id}"}
                refunded = db.execute(
                    "SELECT COALESCE(SUM(amount), 0) FROM refunds WHERE order_id = ?", (order_id,)
                ).fetchone()[0]
                if amount <= 0 or refunded + amount > order["total"] + 1e-9:
                    db.execute("ROLLBACK")
                    left = round(order["total"] - refunded, 2)
                    return {"error": f"refund of {amount} exceeds what is left ({left})"}
                count = db.execute("SELECT COUNT(*) FROM refunds").fetchone()[0]
                refund_id = f"R-{count + 1:04d}"
                db.execute(
                    "INSERT INTO refunds VALUES (?, ?, ?, ?, ?, ?)",
                    (refund_id, order_id, amount, reason, key, _now()),
                )
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return {
            "refund_id": refund_id,
            "order_id": order_id,
            "amount": amount,
            "status": "refunded",
        }

    def email(self, to: str, subject: str, body: str, key: str) -> dict[str, Any]:
        """Queue an e-mail once per idempotency key."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            first = db.execute("SELECT * FROM outbox WHERE idempotency_key = ?", (key,)).fetchone()
            if first is None:
                count = db.execute("SELECT COUNT(*) FROM outbox").fetchone()[0]
                email_id = f"E-{count + 1:04d}"
                db.execute(
                    "INSERT INTO outbox VALUES (?, ?, ?, ?, ?, ?)",
                    (email_id, to, subject, body, key, _now()),
                )
            else:
                email_id = first["email_id"]
            db.execute("COMMIT")
        return {"email_id": email_id, "to": to, "status": "queued"}

    def rows(self, table: str) -> list[dict[str, Any]]:
        """Every row of `refunds` or `outbox`, oldest first."""
        if table not in ("refunds", "outbox", "orders"):
            raise ValueError(table)
        with self._db() as db:
            return [dict(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY rowid")]


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def _ledger(ctx: ToolContext) -> Ledger:
    if not isinstance(ctx.resources, Ledger):
        raise RuntimeError("the worker was started without a Ledger for the support tools")
    return ctx.resources


class LookupOrder(BaseModel):
    order_id: str = Field(description="The order number, e.g. A-1001")


class IssueRefund(BaseModel):
    order_id: str = Field(description="The order to refund")
    amount: float = Field(gt=0, description="Amount to refund, in the order's currency")
    reason: str = Field(description="Why the refund is given")


class SendEmail(BaseModel):
    to: str = Field(description="Recipient e-mail address")
    subject: str
    body: str


@tool
async def lookup_order(args: LookupOrder, ctx: ToolContext) -> str:
    """Look up an order: customer, e-mail, item, total, status and what was refunded."""
    order = await asyncio.to_thread(_ledger(ctx).order, args.order_id)
    return json.dumps(order if order else {"error": f"no order {args.order_id}"})


@tool(side_effects=True, max_attempts=10)
async def issue_refund(args: IssueRefund, ctx: ToolContext) -> str:
    """Refund part or all of an order to the customer."""
    ledger = _ledger(ctx)
    result = await asyncio.to_thread(
        ledger.refund, args.order_id, args.amount, args.reason, ctx.idempotency_key
    )
    return json.dumps(result)


@tool(side_effects=True, max_attempts=10)
async def send_email(args: SendEmail, ctx: ToolContext) -> str:
    """Send an e-mail to a customer."""
    result = await asyncio.to_thread(
        _ledger(ctx).email, args.to, args.subject, args.body, ctx.idempotency_key
    )
    return json.dumps(result)


REFUND_APPROVAL = ApprovalPolicy(
    mode=ApprovalMode.WHEN,
    when=[Condition(field="amount", op=">", value=20)],
    reason="refunds above 20 need a person's approval",
)

SUPPORT_AGENT = Agent(
    name="support",
    instructions=(
        "You are a customer support agent for an online shop. Look orders up before acting. "
        "Refund damaged or missing items up to the order total, then e-mail the customer a "
        "confirmation. Be brief and precise."
    ),
    tools=[lookup_order, issue_refund, send_email],
    limits=Limits(max_steps=12, max_tokens=50_000, max_seconds=3600),
    approvals={"issue_refund": REFUND_APPROVAL},
)
AGENTS = [SUPPORT_AGENT]


def ledger() -> Ledger:
    """The demo's ledger, in KEEL_HOME (`.keel/ledger.db` by default)."""
    from keel.config import Settings

    return Ledger(Settings.from_env().home / "ledger.db")
