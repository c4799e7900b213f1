"""A burst of messages to one idle run: `AgentClient.send_message` against plain updates.

N messages from C senders at once to one run that waits for its next message, sent either
through `AgentClient.send_message` (Keel's client: its worker check, its limit of updates in
flight per run, its retries under the message's id) or through one plain `start_update` each
(`keel.send_message`, the same update ids, no retries of Keel's). Both kinds run in the same
rounds, alternating, on one dev server and one worker: accepted messages, errors, the time
until the last was answered, and each message's latency (sent → receipt).

    python -m bench.burst [--rounds N] [--messages N] [--concurrency C]
                                     # the report goes into docs/benchmarks.md ("A burst of
                                     # messages"); raw results in bench/results/burst.json

`python -m bench.compare` runs the same measurement as one of its sections.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from temporalio.client import WorkflowUpdateStage

from bench.harness import REPO, run_standalone, start_dev_server
from keel.activities.registry import Agent
from keel.client.api import AgentClient
from keel.config import Settings, connect
from keel.testing import AgentEnvironment
from keel.workflows.base import KeelWorkflow
from keel.workflows.models import AgentStatus, Limits, MessageInput, MessageReceipt

DOC = REPO / "docs" / "benchmarks.md"
RAW = REPO / "bench" / "results" / "burst.json"
BEGIN, END = "<!-- bench:burst:begin -->", "<!-- bench:burst:end -->"
KINDS = ("send_message", "start_update")
AGENT = Agent(
    name="burst",
    instructions="You answer briefly.",
    keep_open_seconds=3600,  # idle between turns: every message is for a waiting run
    limits=Limits(max_steps=10_000, max_tokens=10**10),
)
RULES = {"rules": [], "default": {"content": "Noted."}}


@dataclass(frozen=True)
class Scale:
    rounds: int = 3
    messages: int = 300
    concurrency: int = 100


@dataclass
class Burst:
    """One burst: how many were accepted, refused by the run (with why) or failed on the way,
    how long until the last answer, each latency."""

    accepted: int
    errors: int  # failed on the way: the client raised
    seconds: float
    latencies: list[float]
    error_kinds: dict[str, int] = field(default_factory=dict)  # what raised, or why refused
    refused: int = 0  # answered `rejected` by the run's door


@dataclass
class BurstResults:
    meta: dict[str, str]
    scale: dict[str, Any]
    bursts: dict[str, list[Burst]] = field(default_factory=dict)

    @classmethod
    def of(cls, d: dict[str, Any]) -> BurstResults:
        bursts = {k: [Burst(**b) for b in v] for k, v in d.get("bursts", {}).items()}
        return cls(d["meta"], d["scale"], bursts)


async def one_burst(
    send: Callable[[str], Awaitable[MessageReceipt]], messages: int, concurrency: int
) -> Burst:
    """`messages` sends, `concurrency` at a time, each answered with the run's receipt."""
    gate = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    kinds: dict[str, int] = {}
    counts = {"accepted": 0, "refused": 0, "errors": 0}

    async def one(i: int) -> None:
        async with gate:
            t = time.monotonic()
            try:
                receipt = await send(f"burst message {i}")
            except Exception as e:
                why = f"{type(e).__name__}: {str(e)[:80]}"
                kinds[why] = kinds.get(why, 0) + 1
                counts["errors"] += 1
                return
            latencies.append(time.monotonic() - t)
            if receipt.status == "rejected":
                why = f"refused: {receipt.reason[:80]}"
                kinds[why] = kinds.get(why, 0) + 1
                counts["refused"] += 1
            else:
                counts["accepted"] += 1

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(messages)))
    seconds = time.monotonic() - t0
    return Burst(counts["accepted"], counts["errors"], seconds, latencies, kinds, counts["refused"])


async def measure(address: str, workdir: Path, scale: Scale, meta: dict[str, str]) -> BurstResults:
    """Every kind once a round, alternating which goes first, each on a fresh idle run of a
    worker of its own (the dev server is the caller's)."""
    del workdir  # the scripted model and the worker run in this process
    client = await connect(Settings(address=address))
    out = BurstResults(meta, asdict(scale))
    async with AgentEnvironment(client, [AGENT], RULES) as env:
        agents: AgentClient = env.agents

        async def idle_run() -> str:
            run = await env.start(AGENT.name, "hello")
            result = await agents.result(run, timeout=120)
            assert result.status == AgentStatus.IDLE, result
            return run

        for r in range(scale.rounds):
            for kind in KINDS if r % 2 == 0 else tuple(reversed(KINDS)):
                run = await idle_run()
                handle = client.get_workflow_handle(run)

                async def by_client(text: str, run: str = run) -> MessageReceipt:
                    return await agents.send_message(run, text)

                async def by_update(text: str, handle: Any = handle) -> MessageReceipt:
                    m = MessageInput(text=text, id=uuid.uuid4().hex)
                    update = await handle.start_update(
                        KeelWorkflow.send_message,
                        m,
                        id=f"message-{m.id}",
                        wait_for_stage=WorkflowUpdateStage.ACCEPTED,
                    )
                    return await update.result()

                send = by_client if kind == "send_message" else by_update
                burst = await one_burst(send, scale.messages, scale.concurrency)
                out.bursts.setdefault(kind, []).append(burst)
                print(
                    f"[burst] round {r + 1} {kind}: {burst.accepted} accepted in "
                    f"{burst.seconds:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
                await agents.cancel(run)
    return out


def render(results: BurstResults) -> str:
    """The report's section: both kinds side by side."""
    s = results.scale
    lines = [
        "## A burst of messages",
        "",
        f"{s['messages']} messages from {s['concurrency']} senders at once to one idle run, "
        f"{s['rounds']} rounds, alternating which kind goes first (`python -m bench.burst`; "
        f"{results.meta.get('date', '')}, {results.meta.get('machine', '')}). "
        "`send_message` is `AgentClient.send_message`; `start_update` is one plain update each, "
        "with the same update ids and no retries of Keel's.",
        "",
        "| sent through | accepted | refused by the run | failed on the way | "
        "time to the last answer (median) | latency median | latency p95 |",
        "|---|---|---|---|---|---|---|",
    ]
    for kind in KINDS:
        bursts = results.bursts.get(kind, [])
        if not bursts:
            continue
        lat = sorted(x for b in bursts for x in b.latencies)
        p95 = lat[int(0.95 * (len(lat) - 1))] if lat else 0.0
        accepted = "/".join(str(b.accepted) for b in bursts)
        refused = "/".join(str(b.refused) for b in bursts)
        errors = "/".join(str(b.errors) for b in bursts)
        lines.append(
            f"| `{kind}` | {accepted} | {refused} | {errors} | "
            f"{statistics.median(b.seconds for b in bursts):.1f} s | "
            f"{statistics.median(lat) if lat else 0:.2f} s | {p95:.2f} s |"
        )
    for kind in KINDS:
        kinds: dict[str, int] = {}
        for b in results.bursts.get(kind, []):
            for k, v in b.error_kinds.items():
                kinds[k] = kinds.get(k, 0) + v
        if kinds:
            said = "; ".join(f"{k} (× {v})" for k, v in sorted(kinds.items()))
            lines += ["", f"Not accepted through `{kind}`: {said}"]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- alone


async def amain(args: argparse.Namespace) -> BurstResults:
    from bench.compare import keel_revision, log, machine

    t0 = time.monotonic()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python -m bench.burst", *sys.argv[1:]]),
        "machine": machine(),
        "keel": keel_revision(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="keel-bench-burst-"))
    log(f"working directory (logs): {workdir}")
    dev, address = await start_dev_server(workdir)
    try:
        scale = Scale(rounds=args.rounds, messages=args.messages, concurrency=args.concurrency)
        results = await measure(address, workdir, scale, meta)
    finally:
        await dev.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results.meta["wall"] = f"{(time.monotonic() - t0) / 60:.1f} min"
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m bench.burst", description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=Scale.rounds, help="rounds of both kinds")
    p.add_argument("--messages", type=int, default=Scale.messages, help="messages a burst")
    p.add_argument("--concurrency", type=int, default=Scale.concurrency, help="senders at once")
    p.add_argument("--out", type=Path, default=DOC, help="report file (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    p.add_argument(
        "--render", type=Path, metavar="JSON", help="measure nothing: render a saved run"
    )
    run_standalone(p.parse_args(argv), amain, BurstResults.of, render, RAW, (BEGIN, END))


if __name__ == "__main__":
    main()
