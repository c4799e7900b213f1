"""A conversation's cost against its length: "count to K" with payload storage on.

For each K: the bytes the payload store holds against the transcript's own JSON size, the
history bytes each model step adds (the requests refer to the stored conversation), and the
time a step takes early and late in the conversation (from the provider's request log).

    python -m bench.length [--k 10 100 300 1000]   # the report goes into docs/benchmarks.md
                                                   # ("Conversation length")
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from bench.harness import REPO, run_standalone
from keel.activities.tools import ToolContext, tool

DOC = REPO / "docs" / "benchmarks.md"
RAW = REPO / "bench" / "results" / "length.json"
BEGIN, END = "<!-- bench:length:begin -->", "<!-- bench:length:end -->"
DEFAULT_K = (10, 100, 300, 1000)


@dataclass
class Length:
    k: int
    transcript_bytes: int  # the transcript as JSON
    stored_bytes: int  # everything in the payload directory
    stored_files: int
    history_bytes: int  # every history of the run (continued as new on the way)
    histories: int
    request_bytes_first: int  # the model request's bytes in the history: first by reference
    request_bytes_last: int  # ... and the last
    step_ms_early: float  # median time a step took, steps 10..20% of K (from the provider log)
    step_ms_late: float  # ... and in the last 10% of K
    seconds: float


@dataclass
class LengthResults:
    meta: dict[str, str]
    runs: list[Length] = field(default_factory=list)

    @classmethod
    def of(cls, d: dict[str, Any]) -> LengthResults:
        return cls(meta=d["meta"], runs=[Length(**x) for x in d["runs"]])


class AddArgs(BaseModel):
    a: int
    b: int


@tool
async def add(args: AddArgs, ctx: ToolContext) -> str:
    """Add two integers."""
    return json.dumps({"result": args.a + args.b})


def rules(k: int) -> dict[str, Any]:
    add = {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 1}}]}
    return {
        "rules": [
            {"when": {"tool_results_since_user": k}, "reply": {"content": f"counted to {k}"}},
            {"when": {"last_role": "user"}, "reply": add},
            {"when": {"last_role": "tool"}, "reply": add},
        ]
    }


async def measure_one(client: Any, k: int, where: Path) -> Length:
    from temporalio.api.enums.v1 import EventType

    from keel.activities.registry import Agent
    from keel.config import Settings
    from keel.demo.agent import Ledger
    from keel.testing import AgentEnvironment, ScriptedModelServer
    from keel.workflows.models import CALL_MODEL, Limits

    store = where / f"payloads-{k}"
    settings = Settings(task_queue=f"keel-length-{k}-{time.time_ns()}", payload_dir=str(store))
    agent = Agent(
        name="counter",
        instructions="Count with the add tool.",
        tools=[add],
        limits=Limits(max_steps=k + 10, max_tokens=10**12, max_seconds=24 * 3600.0),
    )
    with ScriptedModelServer(rules(k)) as model:
        h = AgentEnvironment(
            client, [agent], model, settings=settings, resources=Ledger(where / f"l{k}.db")
        )
        began = time.monotonic()
        async with h.worker():
            run = await h.start("counter", f"count to {k}")
            await h.agents.result(run, timeout=24 * 3600)
            page = await h.agents.transcript(run)
            transcript = list(page.messages)
            while page.start + len(page.messages) < page.total:
                page = await h.agents.transcript(run, page.start + len(page.messages))
                transcript += page.messages
        seconds = time.monotonic() - began
        arrivals = [r["at"] for r in model.requests()]
    history_bytes, histories, requests = 0, 0, []
    async for w in h.client.list_workflows(f"WorkflowId = '{run}'"):
        history = await h.client.get_workflow_handle(run, run_id=w.run_id).fetch_history()
        histories += 1
        history_bytes += sum(e.ByteSize() for e in history.events)
        for e in history.events:
            a = e.activity_task_scheduled_event_attributes
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED and (
                a.activity_type.name == CALL_MODEL
            ):
                requests.append((e.event_time.ToDatetime(), a.input.ByteSize()))
    requests.sort()
    steps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    early = steps[len(steps) // 10 : max(len(steps) // 5, len(steps) // 10 + 1)]
    late = steps[-max(len(steps) // 10, 1) :]
    files = [p for p in store.rglob("*") if p.is_file()]
    return Length(
        k=k,
        transcript_bytes=len(json.dumps([m.model_dump(mode="json") for m in transcript])),
        stored_bytes=sum(p.stat().st_size for p in files),
        stored_files=len(files),
        history_bytes=history_bytes,
        histories=histories,
        request_bytes_first=requests[1][1] if len(requests) > 1 else 0,
        request_bytes_last=requests[-1][1],
        step_ms_early=1000 * statistics.median(early),
        step_ms_late=1000 * statistics.median(late),
        seconds=seconds,
    )


async def measure(args: argparse.Namespace) -> LengthResults:
    from keel.testing import start_local_temporal

    results = LengthResults(
        meta={"command": "python -m bench.length " + " ".join(map(str, args.k))}
    )
    with tempfile.TemporaryDirectory() as tmp:
        async with await start_local_temporal() as env:
            for k in args.k:
                one = await measure_one(env.client, k, Path(tmp))
                print(one, flush=True)
                results.runs.append(one)
    return results


def render(r: LengthResults) -> str:
    lines = [
        "### Conversation length",
        "",
        '"count to K" with payload storage on (KEEL_PAYLOAD_DIR): each model request refers to '
        "the conversation stored once and brings only the new messages; the provider still "
        f"gets the whole conversation every step. `{r.meta['command']}`.",
        "",
        "| K | transcript | stored | stored / transcript | history per step | request in history "
        "(first → last) | step, early → late | histories |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for x in r.runs:
        lines.append(
            f"| {x.k} | {x.transcript_bytes / 1000:.1f} KB | {x.stored_bytes / 1000:.1f} KB "
            f"({x.stored_files} files) | {x.stored_bytes / x.transcript_bytes:.2f}× | "
            f"{x.history_bytes / (x.k + 1) / 1000:.2f} KB | {x.request_bytes_first} → "
            f"{x.request_bytes_last} B | {x.step_ms_early:.0f} → {x.step_ms_late:.0f} ms | "
            f"{x.histories} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bench.length", description=__doc__.split("\n")[0])
    p.add_argument("--k", type=int, nargs="+", default=list(DEFAULT_K), help="conversation lengths")
    p.add_argument("--out", type=Path, default=DOC, help="the report's file")
    p.add_argument("--render", type=Path, default=None, help="render a saved run instead")
    args = p.parse_args()
    run_standalone(args, measure, LengthResults.of, render, RAW, (BEGIN, END))


if __name__ == "__main__":
    main()
