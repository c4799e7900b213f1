"""The agent `keel chaos` runs: side-effecting transfers over a SQLite ledger, and the
scripted model's rules that drive it.

Its worker processes serve it with
`keel worker --agents keel.chaos.agent:AGENTS --resources keel.chaos.agent:ledger`
(the ledger's path in KEEL_CHAOS_LEDGER). Each run is asked to make `of` transfers; the
scripted model makes them one per step, reading from the conversation which one comes next,
so a queued message or an interrupt mid-run changes nothing in what the run must do.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from keel.activities.registry import Agent
from keel.activities.tools import ToolContext, tool
from keel.workflows.models import (
    ApprovalMode,
    ApprovalPolicy,
    Condition,
    Limits,
    ModelSettings,
)

AGENT_NAME = "chaos"
LEDGER_ENV = "KEEL_CHAOS_LEDGER"
APPROVAL_ABOVE = 50.0  # transfers above this amount wait for a person
MODEL_TIMEOUT_SECONDS = 10.0  # above the scripted model's think time; a "slow" fault is longer
MAX_THINK_SECONDS = 6.0
# the write lands, then the call lingers: a worker killed here leaves a committed effect
# whose activity never completed, the case an idempotency key exists for
TRANSFER_TAIL_SECONDS = 0.4

SCHEMA = """
CREATE TABLE IF NOT EXISTS effects (
    idempotency_key TEXT NOT NULL, op TEXT NOT NULL, run TEXT NOT NULL, n INTEGER NOT NULL,
    amount REAL NOT NULL, pid INTEGER, at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS attempts (
    idempotency_key TEXT NOT NULL, run TEXT NOT NULL, n INTEGER NOT NULL, pid INTEGER,
    at REAL NOT NULL
);
"""


def op_of(run: str, n: int) -> str:
    """The business identity of a transfer: run and number, whatever key a call carries."""
    return f"{run}#{n}"


class ChaosLedger:
    """The system the chaos agent changes. It keeps the first result per idempotency key,
    as a payment API does, and logs every attempt (with the worker's pid and the time)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self._db() as db:
            db.execute("PRAGMA journal_mode=wal")
            db.executescript(SCHEMA)

    @contextmanager
    def _db(self) -> Iterator[sqlite3.Connection]:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        try:
            yield db
        finally:
            db.close()

    def transfer(self, run: str, n: int, amount: float, key: str) -> dict[str, Any]:
        """Record transfer `n` of `run` once per idempotency key; a repeat returns the first."""
        with self._db() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                db.execute(
                    "INSERT INTO attempts VALUES (?, ?, ?, ?, ?)",
                    (key, run, n, os.getpid(), time.time()),
                )
                first = db.execute(
                    "SELECT * FROM effects WHERE idempotency_key = ?", (key,)
                ).fetchone()
                if first is None:
                    db.execute(
                        "INSERT INTO effects VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (key, op_of(run, n), run, n, amount, os.getpid(), time.time()),
                    )
                    amount_done = amount
                else:
                    amount_done = first["amount"]
                db.execute("COMMIT")
            except BaseException:
                if db.in_transaction:
                    db.execute("ROLLBACK")
                raise
        return {"ref": op_of(run, n), "amount": amount_done, "repeat": first is not None}

    def rows(self, table: str = "effects") -> list[dict[str, Any]]:
        """Every row of `effects` or `attempts`, oldest first."""
        if table not in ("effects", "attempts"):
            raise ValueError(table)
        with self._db() as db:
            return [dict(r) for r in db.execute(f"SELECT * FROM {table} ORDER BY rowid")]


def ledger() -> ChaosLedger:
    """The worker's ledger, at KEEL_CHAOS_LEDGER (set by `keel chaos`)."""
    path = os.environ.get(LEDGER_ENV)
    if not path:
        raise RuntimeError(f"{LEDGER_ENV} is not set: `keel chaos` sets it for its workers")
    return ChaosLedger(path)


class Transfer(BaseModel):
    run: str = Field(description="The run this transfer belongs to")
    n: int = Field(ge=1, description="Which transfer of the run this is, from 1")
    of: int = Field(ge=1, description="How many transfers the run makes")
    amount: float = Field(gt=0)


@tool(side_effects=True, max_attempts=20, initial_retry_seconds=0.5)
async def transfer(args: Transfer, ctx: ToolContext) -> str:
    """Move money: one transfer of a run (a side effect, keyed by the idempotency key)."""
    if not isinstance(ctx.resources, ChaosLedger):
        raise RuntimeError("the worker was started without the chaos ledger")
    done = await asyncio.to_thread(
        ctx.resources.transfer, args.run, args.n, args.amount, ctx.idempotency_key
    )
    await asyncio.sleep(TRANSFER_TAIL_SECONDS)
    # what the scripted model reads to pick the next step
    return json.dumps({**done, "n": args.n, "next": args.n + 1, "remaining": args.of - args.n})


CHAOS_AGENT = Agent(
    name=AGENT_NAME,
    instructions="You make the transfers the user asks for, one at a time, then say so.",
    tools=[transfer],
    model=ModelSettings(
        timeout_seconds=MODEL_TIMEOUT_SECONDS,
        max_attempts=4,
        retry_initial_seconds=1.0,
        retry_max_seconds=4.0,
    ),
    limits=Limits(max_steps=200, max_seconds=3600),
    approvals={
        "transfer": ApprovalPolicy(
            mode=ApprovalMode.WHEN,
            when=[Condition(field="amount", op=">", value=APPROVAL_ABOVE)],
            reason=f"transfers above {APPROVAL_ABOVE:g} need a person's approval",
        )
    },
)
AGENTS = [CHAOS_AGENT]

# --- the scripted model's side ----------------------------------------------------------------

FIRST = "chaos run {run}: make {of} transfers of {amount}"
_ASK = r"chaos run (?P<run>\S+): make (?P<of>\d+) transfers of (?P<amount>\d+(?:\.\d+)?)"
_NEXT = r"\"next\": (?P<n>\d+)"
_DONE = r"\"remaining\": 0\b"
_REJECTED = r"^Rejected"
DONE_ANSWER = "All {of} transfers done."
STOPPED_ANSWER = "Stopped: a transfer was rejected."
GAVE_UP_ANSWER = "Gave up: "


def first_message(run: str, of: int, amount: float) -> str:
    """What a chaos run is asked."""
    return FIRST.format(run=run, of=of, amount=f"{amount:g}")


def _transfer_call() -> dict[str, Any]:
    args = {"run": "{run}", "n": "{n:int}", "of": "{of:int}", "amount": "{amount:float}"}
    return {"tool_calls": [{"name": "transfer", "arguments": args}]}


def chaos_rules(think: float = 0.0) -> dict[str, Any]:
    """The scripted model's rules for the chaos agent; each reply takes `think` seconds.

    After a tool result it reads that result; after a user message (a follow-up, an
    interrupt) it reads the latest transfer result in the conversation, so a run never does
    a transfer twice nor skips one, whatever arrives mid-run."""

    def rule(name: str, when: dict[str, Any], reply: dict[str, Any]) -> dict[str, Any]:
        return {"name": name, "when": when, "reply": {**reply, "delay": think}}

    done = {"content": DONE_ANSWER}
    stopped = {"content": STOPPED_ANSWER}
    return {
        "rules": [
            rule(
                "rejected",
                {"last_role": "tool", "last_tool_result": _REJECTED},
                stopped,
            ),
            rule(
                "tool failed",
                {"last_role": "tool", "last_tool_result": r"^(?P<error>Error\b.*)"},
                {"content": GAVE_UP_ANSWER + "{error}"},
            ),
            rule(
                "all done",
                {"last_role": "tool", "last_tool_result": _DONE, "any_user": _ASK},
                done,
            ),
            rule(
                "next transfer",
                {"last_role": "tool", "last_tool_result": _NEXT, "any_user": _ASK},
                _transfer_call(),
            ),
            rule(
                "follow-up, rejected", {"last_role": "user", "any_tool_result": _REJECTED}, stopped
            ),
            rule(
                "follow-up, all done",
                {"last_role": "user", "any_tool_result": _DONE, "any_user": _ASK},
                done,
            ),
            rule(
                "follow-up, go on",
                {"last_role": "user", "any_tool_result": _NEXT, "any_user": _ASK},
                _transfer_call(),
            ),
            rule(
                "first transfer",
                {"last_role": "user", "any_user": _ASK},
                {
                    "tool_calls": [
                        {
                            "name": "transfer",
                            "arguments": {
                                "run": "{run}",
                                "n": 1,
                                "of": "{of:int}",
                                "amount": "{amount:float}",
                            },
                        }
                    ]
                },
            ),
        ],
        "default": {"content": "I do not understand this conversation.", "delay": think},
    }


def request_run(body: dict[str, Any]) -> str | None:
    """The chaos run a model request belongs to (from its first message), if any."""
    for m in body.get("messages") or []:
        if isinstance(m, dict) and m.get("role") == "user":
            found = re.search(_ASK, str(m.get("content") or ""))
            return found.group("run") if found else None
    return None
