"""Keel's streamed replies, measured side by side with streaming off, in interleaved rounds.

1. When a client following `AgentClient.events` sees a reply written over ~2 s: its first
   `model_delta` against the time the provider sent the first piece of text (the scripted
   model logs when each chunk went out), and the `model_reply` with streaming off.
2. What streaming adds to a run's history: `keel.model_stream` signals, workflow tasks, the
   watcher's polls, and batches per second of streaming.
3. Per model step, streaming on against off: K-step conversations with fast replies (written
   within the first batch's wait, so not streamed) and with replies written over 300 ms.

    python -m bench.streaming [--rounds N]   # Keel's .venv only; the report goes into
                                              # docs/benchmarks.md ("Streamed replies")

`python -m bench.compare` runs the same measurement as one of its sections.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import os
import shutil
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.conversation import PIECE, prompt, read_turn, story, story_prompt
from bench.drivers import RUN_TIMEOUT, SPECS, Env, KeelSystem, Started, make
from bench.harness import REPO, Arrivals, run_standalone, start_dev_server, start_fake_model
from bench.measure import Meter, Sample, rotated
from bench.systems.keel_agents import AGENT, WHOLE_AGENT
from keel.workflows.models import SIGNAL_STREAM, AgentStatus, EventKind

DOC = REPO / "docs" / "benchmarks.md"
RAW = REPO / "bench" / "results" / "streaming.json"
BEGIN, END = "<!-- bench:streaming:begin -->", "<!-- bench:streaming:end -->"
POLL_UPDATE = "__temporal_workflow_stream_poll"  # what AgentClient.events sends to the run
KINDS = ("story_on", "story_off", "fast_on", "fast_off", "slow_on", "slow_off")


@dataclass(frozen=True)
class Scale:
    rounds: int = 20
    warmup: int = 1
    pieces: int = 40  # the watched reply: this many pieces (one a chunk) ...
    over_ms: int = 2000  # ... written over this time, from its first chunk to its last ...
    delay_ms: int = 300  # ... after this long to its first chunk (the watcher is waiting then)
    fast_k: int = 20  # K-step conversations, replies at once
    slow_k: int = 5  # K-step conversations, each reply written over slow_over_ms
    slow_over_ms: int = 300


@dataclass
class Watched:
    """One run of the watched reply, followed by a client from its start to its end.
    Times in seconds; None where streaming off has nothing to show."""

    first_piece: float | None  # provider's first piece of text → client's first model_delta
    first_chunk: float | None  # provider's first chunk (the role's, no text) → the same
    reply: float  # provider starts writing → client's model_reply
    reply_tail: float  # provider sent the reply's end (its last chunk, or the whole) → the same
    piece_lags: list[float]  # each piece: provider sent it → client had the delta with it
    streamed_for: float  # provider's first piece → its last chunk (0: not streamed)
    events: int  # in the run's history
    signals: int  # keel.model_stream signals in it
    polls: int  # the watcher's poll updates in it
    tasks: int  # workflow tasks completed
    to_signal: float | None  # provider's first piece → the first signal's event
    to_task: float | None  # that signal → the workflow task that handled it completed


@dataclass
class StreamingResults:
    meta: dict[str, str]
    scale: dict[str, int]
    watched: dict[str, list[Watched]] = field(default_factory=dict)  # "on", "off"
    steps: dict[str, list[Sample]] = field(default_factory=dict)  # fast_on, ..., slow_off

    @classmethod
    def of(cls, d: dict[str, Any]) -> StreamingResults:
        return cls(
            meta=d["meta"],
            scale=d["scale"],
            watched={k: [Watched(**x) for x in v] for k, v in d["watched"].items()},
            steps={k: [Sample(**x) for x in v] for k, v in d["steps"].items()},
        )


class ModelLog:
    """The fake endpoint's request log over its admin API (the endpoint never clears it)."""

    def __init__(self, base_url: str) -> None:
        self._root = base_url.removesuffix("/v1")

    def _call(self, path: str, method: str = "GET") -> Any:
        request = urllib.request.Request(self._root + path, method=method)
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.load(response)

    async def entry(self, tag: str) -> dict[str, Any]:
        """The one request of the run tagged `tag`."""
        got = await asyncio.to_thread(self._call, "/admin/requests")
        for e in got:
            messages = e["body"].get("messages") or []
            turn = read_turn(messages) if isinstance(messages, list) else None
            if turn is not None and turn.tag == tag:
                return dict(e)
        raise RuntimeError(f"the endpoint logged no request of run {tag}")

    async def reset(self) -> None:
        await asyncio.to_thread(self._call, "/admin/reset", "POST")


def seconds(ts: Any) -> float:
    """A history event's time, as time.time() reads it."""
    return float(ts.ToNanoseconds()) / 1e9


async def watched_run(keel: KeelSystem, log: ModelLog, scale: Scale, stream: bool) -> Watched:
    """The watched reply, streaming on or off, followed with AgentClient.events."""
    await log.reset()
    tag = f"st{os.urandom(4).hex()}"
    text = story_prompt(scale.pieces, tag, scale.delay_ms, scale.over_ms)
    run_id = await keel.agents.start(
        AGENT if stream else WHOLE_AGENT,
        text,
        user="bench",
        run_id=keel.new_id(0),
        execution_timeout=RUN_TIMEOUT,
    )
    deltas: list[tuple[float, int]] = []  # when each model_delta came, and its text's length
    reply_at = 0.0
    async for _, e in keel.agents.events(run_id):
        now = time.time()
        if e.kind == EventKind.MODEL_DELTA:
            deltas.append((now, len(e.text)))
        elif e.kind == EventKind.MODEL_REPLY:
            reply_at = now
        elif e.kind == EventKind.MODEL_DISCARD:
            raise RuntimeError(f"run {run_id}: its streamed text was discarded ({e.detail})")
    result = await keel.agents.result(run_id)
    if result.status != AgentStatus.COMPLETED or result.final_answer != story(scale.pieces):
        raise RuntimeError(f"run {run_id} ended {result.status}: {result.final_answer!r:.80}")
    if stream and not deltas:
        raise RuntimeError(f"run {run_id}: a reply written over {scale.over_ms} ms showed no delta")
    entry = await log.entry(tag)
    chunks: list[float] = entry.get("chunks_at") or []
    # a streamed story: the role's chunk, then piece i in chunk i + 1, the finish, the usage
    started = chunks[0] if chunks else entry["at"] + scale.delay_ms / 1000
    ended = chunks[-1] if chunks else started + scale.over_ms / 1000
    out = Watched(None, None, reply_at - started, reply_at - ended, [], 0.0, 0, 0, 0, 0, None, None)
    if deltas:
        out.first_piece = deltas[0][0] - chunks[1]
        out.first_chunk = deltas[0][0] - chunks[0]
        out.streamed_for = chunks[-1] - chunks[1]
        size, written = len(PIECE.format(0)), 0
        for at, n in deltas:
            before, written = written // size, written + n
            out.piece_lags += [at - chunks[i + 1] for i in range(before, written // size)]
    history = await keel.client.get_workflow_handle(run_id).fetch_history()
    signal_at = None
    for e in history.events:
        out.events += 1
        if e.HasField("workflow_execution_signaled_event_attributes"):
            if e.workflow_execution_signaled_event_attributes.signal_name == SIGNAL_STREAM:
                out.signals += 1
                if signal_at is None:
                    signal_at = seconds(e.event_time)
        elif e.HasField("workflow_execution_update_accepted_event_attributes"):
            accepted = e.workflow_execution_update_accepted_event_attributes
            out.polls += accepted.accepted_request.input.name == POLL_UPDATE
        elif e.HasField("workflow_task_completed_event_attributes"):
            out.tasks += 1
            if signal_at is not None and out.to_task is None:
                out.to_task = seconds(e.event_time) - signal_at
    if signal_at is not None and deltas:
        out.to_signal = signal_at - chunks[1]
    return out


async def conversation(keel: KeelSystem, k: int, over_ms: int, stream: bool) -> None:
    """A K-step conversation, waited for as the latency rounds wait (the workflow's result)."""
    run_id = await keel.agents.start(
        AGENT if stream else WHOLE_AGENT,
        prompt(k, over_ms=over_ms),
        user="bench",
        run_id=keel.new_id(k),
        execution_timeout=RUN_TIMEOUT,
    )
    await keel.finish(Started(run_id, k))


async def measure(
    address: str, server_pid: int, workdir: Path, scale: Scale, meta: dict[str, str]
) -> StreamingResults:
    """Every kind of sample once a round, the order rotating, on a fake endpoint and a Keel
    worker of their own (the dev server is the caller's)."""
    fake, url = await start_fake_model(
        workdir, Arrivals(), "--forget-every", "0", name="fakemodel-streaming"
    )
    spec = next(s for s in SPECS if s.key == "keel")
    keel = make(spec, Env(address, url, workdir))
    assert isinstance(keel, KeelSystem)
    log = ModelLog(url)
    out = StreamingResults(meta, dataclasses.asdict(scale))
    try:
        await keel.start()
        meter = Meter(server_pid, fake.pid)

        async def sample(kind: str) -> None:
            stream = kind.endswith("_on")
            if kind.startswith("story"):
                w = await watched_run(keel, log, scale, stream)
                out.watched.setdefault("on" if stream else "off", []).append(w)
                return
            await log.reset()
            k, over = (
                (scale.fast_k, 0) if kind.startswith("fast") else (scale.slow_k, scale.slow_over_ms)
            )
            s = await meter.measure(keel, lambda: conversation(keel, k, over, stream))
            out.steps.setdefault(kind, []).append(s)

        for _ in range(scale.warmup):
            for kind in KINDS:
                await sample(kind)
        out.watched.clear()
        out.steps.clear()
        for r in range(scale.rounds):
            for kind in rotated(KINDS, r):
                await sample(kind)
    finally:
        await keel.stop()
        await fake.stop()
    return out


# --------------------------------------------------------------------------- alone


async def amain(args: argparse.Namespace) -> StreamingResults:
    from bench.compare import keel_revision, log, machine

    t0 = time.monotonic()
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": " ".join(["python -m bench.streaming", *sys.argv[1:]]),
        "machine": machine(),
        "keel": keel_revision(),
    }
    workdir = Path(tempfile.mkdtemp(prefix="keel-bench-streaming-"))
    log(f"working directory (logs): {workdir}")
    dev, address = await start_dev_server(workdir)
    try:
        scale = Scale(rounds=args.rounds, warmup=args.warmup)
        results = await measure(address, dev.pid, workdir, scale, meta)
    finally:
        await dev.stop()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
    results.meta["wall"] = f"{(time.monotonic() - t0) / 60:.1f} min"
    return results


def main(argv: list[str] | None = None) -> None:
    from bench.streaming_report import render

    p = argparse.ArgumentParser(
        prog="python -m bench.streaming", description=__doc__.split("\n")[0]
    )
    p.add_argument("--rounds", type=int, default=Scale.rounds, help="interleaved rounds")
    p.add_argument("--warmup", type=int, default=Scale.warmup, help="unrecorded rounds first")
    p.add_argument("--out", type=Path, default=DOC, help="report file (default: %(default)s)")
    p.add_argument("--keep", action="store_true", help="keep the working directory (logs)")
    p.add_argument(
        "--render", type=Path, metavar="JSON", help="measure nothing: render a saved run"
    )
    run_standalone(p.parse_args(argv), amain, StreamingResults.of, render, RAW, (BEGIN, END))


if __name__ == "__main__":
    main()
