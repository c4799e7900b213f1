"""Replies streamed as they are written: watchers see the text before the model has finished,
and what the run records (the reply, whole) never depends on the stream. A gate in the
scripted model holds a reply half-written (rule "story": three chunks, then the gate)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import signal

import pytest

from keel.workflows.models import AgentStatus, EventKind, MessagePolicy, RunEvent
from tests.conftest import Harness
from tests.rules import STORY
from tests.test_crash import killable_worker

pytestmark = pytest.mark.timeout(120)


async def first_delta(h: Harness, run: str) -> list[RunEvent]:
    """The run's events, followed live, up to its first model_delta."""
    seen: list[RunEvent] = []

    async def follow() -> None:
        async for _, e in h.agents.events(run):
            seen.append(e)
            if e.kind == EventKind.MODEL_DELTA:
                return

    await asyncio.wait_for(follow(), timeout=60)
    return seen


async def all_events(h: Harness, run: str) -> list[RunEvent]:
    return [e async for _, e in h.agents.events(run, follow=False)]


def written(events: list[RunEvent], step: int = 1) -> str:
    """The text a client shows for a step: deltas, less what a discard voided."""
    text = ""
    for e in events:
        if e.step != step:
            continue
        if e.kind == EventKind.MODEL_DELTA and not e.call_id:
            text += e.text
        elif e.kind == EventKind.MODEL_DISCARD:
            text = ""
    return text


async def test_a_reply_shows_in_part_before_the_model_has_finished(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "tell a story")
        await harness.model.wait_held("story")
        seen = await first_delta(harness, run)
        delta = seen[-1]
        # the model is still held mid-reply: its first words are out, the rest is not
        assert harness.model.held("story") == 1
        assert delta.text and STORY.startswith(delta.text) and delta.text != STORY
        assert delta.step == 1 and delta.attempt == 1
        assert not any(e.kind == EventKind.MODEL_REPLY for e in seen)
        harness.model.release("story")
        result = await harness.agents.result(run, timeout=60)
        events = await all_events(harness, run)
    assert result.status == AgentStatus.COMPLETED and result.final_answer == STORY
    assert written(events) == STORY  # the pieces add up to the reply, none twice or lost
    replies = [e for e in events if e.kind == EventKind.MODEL_REPLY and e.step == 1]
    assert len(replies) == 1
    assert not any(e.kind == EventKind.MODEL_DISCARD for e in events)
    # the history holds the batches as signals, few for the reply's pieces
    history = await harness.client.get_workflow_handle(run).fetch_history()
    batches = [
        e
        for e in history.events
        if e.HasField("workflow_execution_signaled_event_attributes")
        and e.workflow_execution_signaled_event_attributes.signal_name == "keel.model_stream"
    ]
    assert 1 <= len(batches) <= 3


async def test_a_worker_killed_mid_stream_voids_the_partial_text_then_replies_once(
    harness: Harness,
) -> None:
    async with killable_worker(harness) as proc:
        run = await harness.start("calc", "tell a story")
        await harness.model.wait_held("story")
        seen = await first_delta(harness, run)
        assert seen[-1].attempt == 1
        proc.send_signal(signal.SIGKILL)
        await proc.wait()
    harness.model.release("story")  # the next attempt is not held
    async with harness.running():
        result = await harness.agents.result(run, timeout=90)
        events = await all_events(harness, run)
    assert result.status == AgentStatus.COMPLETED and result.final_answer == STORY
    step = [e for e in events if e.step == 1 and e.kind.value.startswith("model_")]
    kinds = [e.kind for e in step]
    first_discard = kinds.index(EventKind.MODEL_DISCARD)
    # attempt 1's pieces, then the event that voids them, then the reply, once
    assert all(e.attempt == 1 for e in step[:first_discard])
    assert step[first_discard].detail == "retried"
    assert kinds.count(EventKind.MODEL_REPLY) == 1 and kinds[-1] == EventKind.MODEL_REPLY
    assert written(events) in ("", STORY)  # whatever a client shows is the new attempt's
    assert sum(1 for r in harness.model.requests() if r["rule"] == "story") == 2


async def test_an_interrupt_mid_stream_ends_the_partial_text(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "tell a story")
        await harness.model.wait_held("story")
        await first_delta(harness, run)
        receipt = await harness.agents.send_message(
            run, "never mind, add 2 and 3", MessagePolicy.INTERRUPT
        )
        assert receipt.status == "queued"
        result = await harness.agents.result(run, timeout=60)
        events = await all_events(harness, run)
    assert result.status == AgentStatus.COMPLETED and result.final_answer == "The sum is 5."
    step1 = [e for e in events if e.step == 1]
    discards = [e for e in step1 if e.kind == EventKind.MODEL_DISCARD]
    assert [d.detail for d in discards] == ["interrupted"]
    assert not any(e.kind == EventKind.MODEL_REPLY for e in step1)  # it never finished
    assert written(events) == ""


async def test_a_stream_that_breaks_off_halfway_is_asked_again(harness: Harness) -> None:
    # attempt 1 sends three chunks, waits at the gate, then the connection drops
    harness.model.set_faults(
        [{"kind": "drop", "count": 1, "chunks": 4, "when": {"any_user": "(?i)tell a story"}}]
    )
    async with harness.running():
        run = await harness.start("calc", "tell a story")
        await harness.model.wait_held("story")
        await first_delta(harness, run)
        harness.model.release("story")
        result = await harness.agents.result(run, timeout=60)
        events = await all_events(harness, run)
    assert result.status == AgentStatus.COMPLETED and result.final_answer == STORY
    assert [r["outcome"] for r in harness.model.requests() if r["rule"] == "story"] == [
        "fault:drop",
        "served",
    ]
    kinds = [e.kind for e in events if e.step == 1 and e.kind.value.startswith("model_")]
    assert EventKind.MODEL_DISCARD in kinds and kinds.count(EventKind.MODEL_REPLY) == 1
    assert kinds.index(EventKind.MODEL_DISCARD) < kinds.index(EventKind.MODEL_REPLY)


async def test_a_badly_streamed_reply_is_asked_for_whole(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    # a chunk that is not JSON after the gate: the pieces shown are voided, the reply comes
    # whole in the same attempt, and the worker says so once
    harness.model.set_faults(
        [{"kind": "malformed", "count": 1, "chunks": 4, "when": {"any_user": "(?i)tell"}}]
    )
    caplog.set_level(logging.WARNING, logger="keel.model")
    async with harness.running():
        run = await harness.start("calc", "tell a story")
        await harness.model.wait_held("story")
        await first_delta(harness, run)
        harness.model.release("story")
        result = await harness.agents.result(run, timeout=60)
        events = await all_events(harness, run)
    assert result.status == AgentStatus.COMPLETED and result.final_answer == STORY
    step = [e for e in events if e.step == 1 and e.kind.value.startswith("model_")]
    assert [e.detail for e in step if e.kind == EventKind.MODEL_DISCARD] == ["retried"]
    assert step[-1].kind == EventKind.MODEL_REPLY
    said = [r for r in caplog.records if "streamed a reply badly" in r.getMessage()]
    assert len(said) == 1


async def test_a_provider_that_cannot_stream_gets_whole_requests(
    harness: Harness, caplog: pytest.LogCaptureFixture
) -> None:
    harness.model.set_faults(
        [{"kind": "400", "count": 1, "message": "Invalid request: stream is not supported"}]
    )
    caplog.set_level(logging.WARNING, logger="keel.model")
    async with harness.running():
        run = await harness.start("calc", "add 2 and 3")
        result = await harness.agents.result(run, timeout=60)
    assert result.status == AgentStatus.COMPLETED and result.final_answer == "The sum is 5."
    bodies = [r["body"] for r in harness.model.requests()]
    # the refused stream, then whole requests: this step's, and the next step's
    assert [bool(b.get("stream")) for b in bodies] == [True, False, False]
    said = [r for r in caplog.records if "does not stream replies" in r.getMessage()]
    assert len(said) == 1


async def test_an_agent_may_turn_streaming_off(harness: Harness) -> None:
    from keel.workflows.models import ModelSettings
    from tests.agents import TEST_AGENTS

    calc = next(a for a in TEST_AGENTS if a.name == "calc")
    settings = ModelSettings(stream=False, max_tokens=50)
    quiet = dataclasses.replace(calc, name="quiet", model=settings)
    async with harness.running([*TEST_AGENTS, quiet]):
        run = await harness.start("quiet", "add 2 and 3")
        result = await harness.agents.result(run, timeout=60)
    assert result.final_answer == "The sum is 5."
    assert not any(r["body"].get("stream") for r in harness.model.requests())
    assert {r["body"].get("max_tokens") for r in harness.model.requests()} == {50}


def test_usage_is_estimated_when_the_provider_reports_none() -> None:
    from openai import AsyncOpenAI

    from keel.activities.model import ModelActivities
    from keel.activities.streaming import Reply

    client = AsyncOpenAI(base_url="http://127.0.0.1:9/v1", api_key="x")
    body = {"model": "m", "messages": [{"role": "user", "content": "a" * 400}]}
    usage = ModelActivities(None, None, "m")._estimate(client, body, Reply(text="b" * 40))
    assert usage.completion_tokens == 10 and 100 <= usage.prompt_tokens <= 120
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_keel_watch_writes_a_reply_on_one_line_as_it_grows() -> None:
    from datetime import UTC, datetime

    from keel.client.cli import EventPrinter

    at = datetime(2026, 1, 1, tzinfo=UTC)
    p = EventPrinter("r")

    def ev(kind: EventKind, **f: object) -> RunEvent:
        return RunEvent(kind=kind, at=at, **f)  # type: ignore[arg-type]

    out = p.feed(1, ev(EventKind.MODEL_DELTA, step=1, attempt=1, text="Once "))
    out += p.feed(2, ev(EventKind.MODEL_DELTA, step=1, attempt=1, text="upon"))
    assert out.endswith("writing: Once upon") and "\n" not in out  # still growing
    out = p.feed(3, ev(EventKind.MODEL_DISCARD, step=1, detail="retried"))
    assert out == " [retried: not the reply]\n"
    out = p.feed(4, ev(EventKind.MODEL_DELTA, step=1, attempt=2, text="Hi"))
    out += p.feed(5, ev(EventKind.MODEL_DELTA, step=1, attempt=2, call_id="0", tool="add"))
    out += p.feed(6, ev(EventKind.MODEL_DELTA, step=1, attempt=2, call_id="0", arguments='{"a"'))
    out += p.feed(7, ev(EventKind.MODEL_REPLY, step=1, text="Hi", model="m", detail="add(a=1)"))
    lines = out.splitlines()
    assert lines[0].endswith('writing: Hi  → add({"a")')
    assert "model m" in lines[1] and "'Hi'" not in lines[1]  # the text is not said twice


async def test_keel_watch_shows_the_reply_as_it_is_written(harness: Harness) -> None:
    from tests.test_cli import KEEL

    async with harness.running():
        run = await harness.start("calc", "tell a story")
        await harness.model.wait_held("story")
        env = {
            **os.environ,
            "TEMPORAL_ADDRESS": harness.client.service_client.config.target_host,
            "KEEL_TASK_QUEUE": harness.settings.task_queue,
        }
        proc = await asyncio.create_subprocess_exec(
            KEEL, "watch", run, env=env, stdout=asyncio.subprocess.PIPE
        )
        assert proc.stdout is not None
        shown = b""
        while b"writing: " not in shown or shown.endswith(b"writing: "):
            shown += await asyncio.wait_for(proc.stdout.read(64), 60)
        partial = shown.decode().split("writing: ", 1)[1]
        assert STORY.startswith(partial) and partial != STORY  # the rest is still held
        harness.model.release("story")
        rest, _ = await asyncio.wait_for(proc.communicate(), 60)
    out = (shown + rest).decode()
    lines = out.splitlines()
    assert lines[-1].endswith("ENDED completed: " + STORY)
    assert sum(STORY in line for line in lines[:-1]) == 1  # written once, as it came
