"""One run flooded by its clients: 100,000 `keel.resume` signals, 10,000 decisions (refused:
unknown calls, sent again, an approver the call does not name, the decision rate) and
10,000 refused messages to a run parked on an approval, then a real message and the real
approval. Reports the rate the run absorbed them, each history's length, size and start
input (the carried state), and reading the whole record back.

    python -m bench.flood [--resumes N]   # Keel's .venv only; the report goes into
                                          # docs/benchmarks.md ("A run flooded by clients")

Signals go out AT_ONCE at a time, in waves of WAVE: after each wave the bench waits until
the run has recorded it (a faster client only fills one workflow task past the SDK's 2 s
deadlock detector: see the report's notes).
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from functools import partial
from pathlib import Path
from typing import Any

from pydantic import BaseModel
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client
from temporalio.service import RPCError

from bench.harness import REPO, run_standalone
from keel.activities import Agent, ToolContext, tool
from keel.client.api import KeelClientError
from keel.testing import AgentEnvironment, start_local_temporal
from keel.workflows.models import (
    SIGNAL_DECIDE,
    SIGNAL_MESSAGE,
    SIGNAL_RESUME,
    AgentStatus,
    ApprovalMode,
    ApprovalPolicy,
    Condition,
)

RUN_TIMEOUT = timedelta(hours=2)

DOC = REPO / "docs" / "benchmarks.md"
RAW = REPO / "bench" / "results" / "flood.json"
BEGIN, END = "<!-- bench:flood:begin -->", "<!-- bench:flood:end -->"
AT_ONCE = 500
WAVE = 1000
RULES = {
    "rules": [
        {
            "name": "charge",
            "when": {"last_role": "user", "last_user": "(?i)charge (?P<amount>\\d+)"},
            "reply": {"tool_calls": [{"name": "charge", "arguments": {"amount": "{amount:int}"}}]},
        },
        {
            "name": "after tool",
            "when": {"last_role": "tool", "last_tool_result": "(?s)(?P<output>.*)"},
            "reply": {"content": "Done: {output}"},
        },
        {
            "name": "echo",
            "when": {"last_role": "user", "last_user": "(?is)^(?P<text>.*)$"},
            "reply": {"content": "You said: {text}"},
        },
    ]
}


class ChargeArgs(BaseModel):
    amount: int


@tool(side_effects=True)
async def charge(args: ChargeArgs, ctx: ToolContext) -> str:
    """Charge the customer."""
    return f"charged {args.amount}"


AGENT = Agent(
    name="flooded",
    instructions="You charge customers.",
    tools=[charge],
    approvals={
        "charge": ApprovalPolicy(
            mode=ApprovalMode.WHEN,
            when=[Condition(field="amount", op=">", value=20)],
            approvers=["alice"],
        )
    },
    keep_open_seconds=3600,
)


@dataclass
class FloodResults:
    meta: dict[str, str]
    sent: dict[str, int] = field(default_factory=dict)  # accepted by the server, per kind
    seconds: dict[str, float] = field(default_factory=dict)  # sending and absorbing them
    audit: dict[str, int] = field(default_factory=dict)  # the record read back, by kind
    histories: list[list[int]] = field(default_factory=list)  # events, bytes, start input
    record_seconds: float = 0.0
    record_entries: int = 0
    healthy: bool = False  # answered the message, ran the approved call, went idle

    @classmethod
    def of(cls, raw: dict[str, Any]) -> FloodResults:
        return cls(**raw)


async def recorded(env: AgentEnvironment, run: str) -> int:
    """Audit entries the run has recorded so far (archived or held)."""
    while True:
        try:
            s = await env.agents.get_state(run)
            return (s.archive.audit.dropped if s.archive else 0) + len(s.audit)
        except KeelClientError:  # the worker, busy with a wave, did not answer in time
            continue


async def send_in_waves(
    env: AgentEnvironment, run: str, sends: list[Callable[[], Awaitable[Any]]]
) -> int:
    accepted = 0
    for w in range(0, len(sends), WAVE):
        before = await recorded(env, run)
        sent = 0
        wave = sends[w : w + WAVE]
        for i in range(0, len(wave), AT_ONCE):
            done = await asyncio.gather(
                *(s() for s in wave[i : i + AT_ONCE]), return_exceptions=True
            )
            sent += sum(1 for d in done if not isinstance(d, RPCError | BaseException))
        accepted += sent
        while await recorded(env, run) < before + sent:
            await asyncio.sleep(0.2)
    return accepted


async def chain(client: Client, run: str) -> list[list[int]]:
    desc = await client.get_workflow_handle(run).describe()
    run_id = desc.raw_description.workflow_execution_info.first_run_id
    out = []
    while run_id:
        handle = client.get_workflow_handle(run, run_id=run_id)
        info = (await handle.describe()).raw_description.workflow_execution_info
        run_id, start = "", 0
        async for event in handle.fetch_history_events():
            if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_STARTED:
                payloads = event.workflow_execution_started_event_attributes.input.payloads
                start = sum(p.ByteSize() for p in payloads)
            elif event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CONTINUED_AS_NEW:
                attrs = event.workflow_execution_continued_as_new_event_attributes
                run_id = attrs.new_execution_run_id
        out.append([info.history_length, info.history_size_bytes, start])
    return out


async def measure(args: argparse.Namespace) -> FloodResults:
    from bench.compare import keel_revision, machine

    out = FloodResults(
        meta={
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "command": f"python -m bench.flood --resumes {args.resumes}",
            "machine": machine(),
            "keel": keel_revision(),
        }
    )
    async with await start_local_temporal() as temporal:
        async with AgentEnvironment(temporal.client, [AGENT], RULES) as env:
            # no run timeout: 120,000 signals outlast the test kit's five minutes
            run = await env.start("flooded", "charge 30", execution_timeout=RUN_TIMEOUT)
            while not (await env.agents.get_state(run)).pending_approvals:
                await asyncio.sleep(0.2)
            call = (await env.agents.get_state(run)).pending_approvals[0].call_id
            handle = env.client.get_workflow_handle(run)
            floods = {
                "resume": [partial(handle.signal, SIGNAL_RESUME) for _ in range(args.resumes)],
                "decide": [
                    partial(
                        handle.signal,
                        SIGNAL_DECIDE,
                        {
                            "call_id": call if i % 2 else f"nope-{i % 4000}",
                            "decision": "approve",
                            "approver": "mallory",
                        },
                    )
                    for i in range(args.decisions)
                ],
                "message": [
                    partial(handle.signal, SIGNAL_MESSAGE, {"text": " ", "id": f"e{i}"})
                    for i in range(args.messages)
                ],
            }
            for kind, sends in floods.items():
                t = time.monotonic()
                out.sent[kind] = await send_in_waves(env, run, sends)
                out.seconds[kind] = time.monotonic() - t
            await env.agents.send_message(run, "say hello")
            while True:
                try:
                    if (await env.agents.approve(run, call, "alice")).accepted:
                        break
                except Exception:  # refused while the flood spent the decision rate
                    await asyncio.sleep(0.5)
            while True:
                s = await env.agents.get_state(run)
                if s.status == AgentStatus.IDLE and not s.queued_messages:
                    break
                await asyncio.sleep(0.2)
            replies = [m.content for m in s.transcript if m.role == "assistant"]
            out.healthy = bool(s.effects) and replies[-1] == "You said: say hello"
            t = time.monotonic()
            record = await env.agents.record(run)
            out.record_seconds = time.monotonic() - t
            out.record_entries = len(record.audit)
            out.audit = dict(Counter(e.kind.value for e in record.audit))
            out.histories = await chain(env.client, run)
    return out


def render(r: FloodResults) -> str:
    h = r.histories
    sent = sum(r.sent.values())
    secs = sum(r.seconds.values())
    lines = [
        "### A run flooded by clients",
        "",
        f"Measured {r.meta['date']} by `{r.meta['command']}` on {r.meta['machine']} "
        f"(Keel {r.meta['keel']}), on the dev server's default limits.",
        "",
        "| flood | sent (accepted) | seconds | signals/s | recorded |",
        "|---|---:|---:|---:|---:|",
    ]
    recorded_as = {"resume": "resume", "decide": "decision_refused", "message": "message_rejected"}
    for kind, n in r.sent.items():
        lines.append(
            f"| {kind} | {n} | {r.seconds[kind]:.0f} | {n / r.seconds[kind]:.0f} | "
            f"{r.audit.get(recorded_as[kind], 0)} |"
        )
    lines += [
        f"| all | {sent} | {secs:.0f} | {sent / secs:.0f} | {r.record_entries} |",
        "",
        f"- Histories: {len(h)}; events per history max {max(x[0] for x in h)} "
        f"(Temporal warns at 10,240); bytes max {max(x[1] for x in h) / 1e6:.2f} MB "
        "(warns at 10 MB).",
        f"- Carried state (each history's start input): max {max(x[2] for x in h) / 1e3:.1f} "
        f"KB, last {h[-1][2] / 1e3:.1f} KB.",
        f"- The whole record read back (`AgentClient.record`, {len(h)} histories): "
        f"{r.record_entries} audit entries in {r.record_seconds:.1f} s.",
        f"- Afterwards the run answered a message and ran the approved call: {r.healthy}.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.flood", description=__doc__.split("\n")[0])
    p.add_argument("--resumes", type=int, default=100_000)
    p.add_argument("--decisions", type=int, default=10_000)
    p.add_argument("--messages", type=int, default=10_000)
    p.add_argument("--out", type=Path, default=DOC, help="report file (default: %(default)s)")
    p.add_argument("--render", type=Path, metavar="JSON", help="render a saved run")
    run_standalone(p.parse_args(argv), measure, FloodResults.of, render, RAW, (BEGIN, END))


if __name__ == "__main__":
    main()
