"""What a tool costs as a tool of an MCP server, against the same tool as a `@tool`.

One agent calls `add` as a `@tool`, another calls the same function served by an MCP server
over stdio (`python -m bench.mcp --serve`, the `mcp` package's FastMCP), in interleaved
rounds on one Keel worker and the scripted model. From each run's history: the tool
activity's time (scheduled → completed) and the run's (started → closed); the MCP run also
lists its server once, in an activity of its own, which is reported apart.

    python -m bench.mcp [--rounds N]   # the report goes into docs/benchmarks.md ("MCP tools")

`python -m bench.compare` runs the same measurement as one of its sections.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bench.harness import REPO, run_standalone, start_dev_server
from keel.activities.mcp import MCPStdio
from keel.activities.registry import Agent
from keel.activities.tools import ToolContext, tool
from keel.client.api import AgentClient
from keel.config import Settings, connect
from keel.plugin import ModelProvider, build_worker
from keel.testing import ScriptedModelServer

DOC = REPO / "docs" / "benchmarks.md"
RAW = REPO / "bench" / "results" / "mcp.json"
BEGIN, END = "<!-- bench:mcp:begin -->", "<!-- bench:mcp:end -->"
RULES: dict[str, Any] = {
    "rules": [
        {
            "name": "mcp",
            "when": {"last_role": "user", "last_user": "via mcp"},
            "reply": {"tool_calls": [{"name": "calc_add", "arguments": {"a": 2, "b": 3}}]},
        },
        {
            "name": "tool",
            "when": {"last_role": "user", "last_user": "via tool"},
            "reply": {"tool_calls": [{"name": "add", "arguments": {"a": 2, "b": 3}}]},
        },
        {"name": "done", "when": {"last_role": "tool"}, "reply": {"content": "Done."}},
    ]
}


class AddArgs(BaseModel):
    a: int
    b: int


def _sum(a: int, b: int) -> str:
    return json.dumps({"result": a + b})


@tool
async def add(args: AddArgs, ctx: ToolContext) -> str:
    """Add two integers."""
    return _sum(args.a, args.b)


AGENTS = [
    Agent(name="bench-tool", instructions="Add.", tools=[add]),
    Agent(
        name="bench-mcp",
        instructions="Add.",
        toolsets=[
            MCPStdio("calc", sys.executable, ["-m", "bench.mcp", "--serve"], read_only=["add"])
        ],
    ),
]


@dataclass
class MCPResults:
    meta: dict[str, str]
    rounds: int
    # per kind ("tool", "mcp"): milliseconds, one sample a round
    activity_ms: dict[str, list[float]] = field(default_factory=dict)
    run_ms: dict[str, list[float]] = field(default_factory=dict)
    list_ms: list[float] = field(default_factory=list)  # the MCP run's listing activity

    @classmethod
    def of(cls, d: dict[str, Any]) -> MCPResults:
        return cls(**d)


def _ms(a: Any, b: Any) -> float:
    return (b.ToDatetime() - a.ToDatetime()).total_seconds() * 1000


def _timings(history: Any) -> tuple[float, float, float]:
    """(run_tool activity, the whole run, the MCP listing or 0) in ms, from the history."""
    events = history.events
    scheduled: dict[int, tuple[str, Any]] = {}
    spans: dict[str, float] = {}
    for e in events:
        if e.HasField("activity_task_scheduled_event_attributes"):
            name = e.activity_task_scheduled_event_attributes.activity_type.name
            scheduled[e.event_id] = (name, e.event_time)
        if e.HasField("activity_task_completed_event_attributes"):
            name, at = scheduled[e.activity_task_completed_event_attributes.scheduled_event_id]
            spans[name] = _ms(at, e.event_time)
    return (
        spans["keel.run_tool"],
        _ms(events[0].event_time, events[-1].event_time),
        spans.get("keel.mcp_list_tools", 0.0),
    )


async def measure(address: str, meta: dict[str, str], rounds: int, warmup: int = 2) -> MCPResults:
    """Interleaved rounds of one `@tool` run and one MCP run on a worker of its own."""
    settings = Settings(address=address, task_queue=f"bench-mcp-{uuid.uuid4().hex[:8]}")
    client = await connect(settings)
    agents = AgentClient(client, settings)
    out = MCPResults(meta=meta, rounds=rounds)
    with ScriptedModelServer(RULES) as model:
        worker = build_worker(
            client,
            settings=settings,
            agents=AGENTS,
            model=ModelProvider(base_url=model.base_url, model="scripted"),
        )
        async with worker:
            for i in range(warmup + rounds):
                kinds = ("tool", "mcp") if i % 2 == 0 else ("mcp", "tool")
                for kind in kinds:
                    run = await agents.start(f"bench-{kind}", f"add via {kind}")
                    await agents.result(run, timeout=120)
                    history = await client.get_workflow_handle(run).fetch_history()
                    if i < warmup:
                        continue
                    activity_ms, run_ms, list_ms = _timings(history)
                    out.activity_ms.setdefault(kind, []).append(activity_ms)
                    out.run_ms.setdefault(kind, []).append(run_ms)
                    if kind == "mcp":
                        out.list_ms.append(list_ms)
    return out


def render(r: MCPResults) -> str:
    """The report block: medians (and p90) side by side."""

    def cell(xs: list[float]) -> str:
        if not xs:
            return "–"
        p90 = statistics.quantiles(xs, n=10)[-1] if len(xs) > 1 else xs[0]
        return f"{statistics.median(xs):.1f} ms (p90 {p90:.1f})"

    tool, mcp = r.activity_ms.get("tool", []), r.activity_ms.get("mcp", [])
    over = statistics.median(mcp) - statistics.median(tool) if tool and mcp else 0.0
    return (
        "\n### MCP tools: a tool call's overhead\n\n"
        f"{r.meta.get('date', '')} · `{r.meta.get('command', '')}` · {r.rounds} interleaved "
        "rounds, one run of each kind a round; the same `add` as a `@tool` and as a tool of an "
        "MCP server over stdio (one session per worker process, opened before the rounds).\n\n"
        "| | `@tool` | MCP tool |\n|---|---|---|\n"
        f"| tool activity (scheduled → completed) | {cell(tool)} | {cell(mcp)} |\n"
        f"| whole run (one call, two model steps) | {cell(r.run_ms.get('tool', []))} | "
        f"{cell(r.run_ms.get('mcp', []))} |\n"
        f"| listing the server (once a run) | – | {cell(r.list_ms)} |\n\n"
        f"An MCP call adds {over:.1f} ms (medians) to the tool activity; the listing, once "
        "a run, adds an activity before the first model step.\n"
    )


async def amain(args: argparse.Namespace) -> MCPResults:
    from bench.compare import keel_revision, machine

    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python -m bench.mcp", *sys.argv[1:]]),
        "machine": machine(),
        "keel": keel_revision(),
    }
    dev, address = await start_dev_server(Path(tempfile.mkdtemp(prefix="keel-bench-mcp-")))
    try:
        return await measure(address, meta, args.rounds)
    finally:
        await dev.stop()


def serve() -> None:
    """The MCP server the bench's agent calls (stdio)."""
    from mcp.server.fastmcp import FastMCP

    server = FastMCP("calc", log_level="WARNING")

    @server.tool(name="add")
    def add_tool(a: int, b: int) -> str:
        """Add two integers."""
        return _sum(a, b)

    server.run("stdio")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.mcp", description=__doc__.split("\n")[0])
    p.add_argument("--serve", action="store_true", help="be the MCP server the bench calls")
    p.add_argument("--rounds", type=int, default=30, help="interleaved rounds")
    p.add_argument("--out", type=Path, default=DOC, help="report file (default: %(default)s)")
    p.add_argument("--render", type=Path, metavar="JSON", help="measure nothing: render a run")
    args = p.parse_args(argv)
    if args.serve:
        serve()
        return
    run_standalone(args, amain, MCPResults.of, render, RAW, (BEGIN, END))


if __name__ == "__main__":
    main()
