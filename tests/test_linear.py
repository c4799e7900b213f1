"""A conversation stored once: with payload storage on, each model request refers to the
context the worker stored and brings only what is new, and the provider still sees the whole
conversation every step (keel.workflows.transcript_ref, keel.activities.transcripts)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.testing import WorkflowEnvironment

from keel.activities.registry import Agent
from keel.config import Settings
from keel.demo.agent import Ledger
from keel.testing import AgentEnvironment, ScriptedModelServer
from keel.workflows.errors import TRANSCRIPT_MISSING
from keel.workflows.models import (
    CALL_MODEL,
    AgentStatus,
    ChatMessage,
    Limits,
    MessagePolicy,
    ModelInput,
)
from tests.agents import add
from tests.conftest import wait_for

STEPS = 40
ADD = {"tool_calls": [{"name": "add", "arguments": {"a": 1, "b": 1}}]}
RULES: dict[str, Any] = {
    "rules": [
        {"when": {"last_user": "(?i)^count far", "tool_results_since_user": STEPS}, "reply": {"content": "done"}},
        {"when": {"last_user": "(?i)^count to three", "tool_results_since_user": 3}, "reply": {"content": "three"}},
        {"when": {"last_user": "(?i)^count to twenty", "tool_results_since_user": 20}, "reply": {"content": "twenty"}},
        {"when": {"last_user": "(?i)^count slowly", "tool_results_since_user": 2}, "reply": {"hold": "slow", **ADD}},
        {"when": {"last_user": "(?i)^count"}, "reply": ADD},
    ]
}  # fmt: skip
LIMITS = Limits(max_steps=500, max_tokens=10**9)
AGENTS = [
    Agent(name="counter", instructions="Count.", tools=[add], limits=LIMITS),
    Agent(
        name="counter-chat",
        instructions="Count.",
        tools=[add],
        limits=LIMITS,
        keep_open_seconds=600,
        message_policy=MessagePolicy.ROLLBACK,
    ),
]


@pytest.fixture
def counting() -> Iterator[ScriptedModelServer]:
    with ScriptedModelServer(RULES) as server:
        yield server


def stored(
    tmp_path: Path, env: WorkflowEnvironment, model: ScriptedModelServer
) -> AgentEnvironment:
    settings = Settings(
        task_queue=f"keel-linear-{tmp_path.name}"[:60], payload_dir=str(tmp_path / "p")
    )
    return AgentEnvironment(
        env.client, AGENTS, model, settings=settings, resources=Ledger(tmp_path / "l.db")
    )


def store_bytes(tmp_path: Path) -> int:
    return sum(p.stat().st_size for p in (tmp_path / "p").rglob("*") if p.is_file())


async def model_inputs(h: AgentEnvironment, run: str) -> list[tuple[int, ModelInput]]:
    """Each model request of every history of the run (oldest first): its size as the
    history keeps it, and what it carried."""
    out = []
    runs = [w async for w in h.client.list_workflows(f"WorkflowId = '{run}'")]
    for w in sorted(runs, key=lambda w: w.start_time):
        history = await h.client.get_workflow_handle(run, run_id=w.run_id).fetch_history()
        for e in history.events:
            a = e.activity_task_scheduled_event_attributes
            if (
                e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED
                and a.activity_type.name == CALL_MODEL
            ):
                (value,) = await h.client.data_converter.decode(a.input.payloads, [ModelInput])
                out.append((a.input.ByteSize(), value))
    return out


async def failures(h: AgentEnvironment, run: str) -> list[str]:
    """The failure types of every model activity task that failed, in every history."""
    out = []
    async for w in h.client.list_workflows(f"WorkflowId = '{run}'"):
        history = await h.client.get_workflow_handle(run, run_id=w.run_id).fetch_history()
        for e in history.events:
            if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_FAILED:
                f = e.activity_task_failed_event_attributes.failure
                out.append(f.application_failure_info.type)
    return out


def seen(model: ScriptedModelServer, tag: str) -> list[list[dict[str, Any]]]:
    """The messages of each request the provider got in the run whose first user says `tag`."""
    bodies = [r["body"]["messages"] for r in model.requests()]
    return [m for m in bodies if len(m) > 1 and m[1]["content"].startswith(tag)]


def wire(messages: list[ChatMessage]) -> list[tuple[str, str]]:
    return [(m.role, m.content or "") for m in messages]


def sent(messages: list[dict[str, Any]]) -> list[tuple[str, str]]:
    return [(m["role"], m["content"] or "") for m in messages]


async def test_a_long_conversation_is_stored_once(
    env: WorkflowEnvironment, counting: ScriptedModelServer, tmp_path: Path
) -> None:
    h = stored(tmp_path, env, counting)
    async with h.worker():
        run = await h.start("counter", "count far")
        result = await h.agents.result(run, timeout=300)
        state = await h.agents.get_state(run)
        transcript = (await h.agents.transcript(run)).messages
    assert result.status == AgentStatus.COMPLETED and result.final_answer == "done"
    inputs = await model_inputs(h, run)
    assert len(transcript) == 2 + 2 * STEPS + 1 and state.step == STEPS + 1
    size = len(json.dumps([m.model_dump(mode="json") for m in transcript]))
    assert store_bytes(tmp_path) <= 3 * size, (store_bytes(tmp_path), size)

    # the history: every request after the first of a history refers to the stored context
    # and brings two messages (the model's call and its result); its size does not grow
    assert len(inputs) == STEPS + 1
    by_ref = [(n, i) for n, i in inputs if i.base]
    assert len(by_ref) >= STEPS - 1, [(i.step, i.base[:6], len(i.messages)) for _, i in inputs]
    assert all(len(i.messages) == 2 and not i.reserved_call_ids for _, i in by_ref)
    sizes = [n for n, _ in by_ref]
    assert max(sizes) - min(sizes) < 64 and max(sizes) < 2048, sizes
    runs = [w async for w in h.client.list_workflows(f"WorkflowId = '{run}'")]
    assert len(runs) >= 2  # it continued as new on the way, and kept referring

    # the provider saw the whole conversation each step
    requests = seen(counting, "count far")
    assert [len(m) for m in requests] == [2 + 2 * i for i in range(STEPS + 1)]
    assert sent(requests[-1]) == wire(transcript[:-1])


async def test_a_lost_piece_sends_the_step_whole_and_a_new_worker_reads_the_store(
    env: WorkflowEnvironment, counting: ScriptedModelServer, tmp_path: Path
) -> None:
    """A worker that starts afresh (nothing in memory) rebuilds the context from the store;
    when the store lost it, the step goes whole once, and the run goes on."""
    h = stored(tmp_path, env, counting)
    async with h.worker():
        run = await h.start("counter-chat", "count to twenty")
        await wait_for(lambda: _idle(h, run, "twenty"), timeout=120)
    async with h.worker():  # a new worker: its memory is empty, the store is not
        await h.agents.send_message(run, "count to three")
        await wait_for(lambda: _idle(h, run, "three"), timeout=120)
    assert TRANSCRIPT_MISSING not in await failures(h, run)
    shutil.rmtree(tmp_path / "p" / "transcripts")  # the store lost every piece
    async with h.worker():
        await h.agents.send_message(run, "count to twenty again")
        await wait_for(lambda: _idle(h, run, "twenty"), timeout=120)
        transcript = (await h.agents.transcript(run)).messages
        await h.agents.cancel(run)
    inputs = await model_inputs(h, run)
    assert (await failures(h, run)).count(TRANSCRIPT_MISSING) == 1
    requests = seen(counting, "count to twenty")
    assert [len(m) for m in requests[:21]] == [2 + 2 * i for i in range(21)]
    assert sent(requests[-1]) == wire(transcript[:-1])  # whole, every step of every turn
    # after the loss: the request that referred to it, then that step whole, then by
    # reference again (turns of 21 and 4 steps before: the third turn starts at step 26)
    after = [i for _, i in inputs if i.step >= 26]
    assert after[0].base and not after[1].base and len(after[1].messages) > 50
    assert all(i.base and len(i.messages) <= 3 for i in after[2:])


async def test_rollback_drops_the_turn_from_the_stored_context(
    env: WorkflowEnvironment, counting: ScriptedModelServer, tmp_path: Path
) -> None:
    h = stored(tmp_path, env, counting)
    async with h.worker():
        run = await h.start("counter-chat", "count to three")
        await wait_for(lambda: _idle(h, run, "three"), timeout=120)
        await h.agents.send_message(run, "count slowly")
        await counting.wait_held("slow")
        await h.agents.send_message(run, "count to three, please")  # the agent rolls back
        await wait_for(lambda: _idle(h, run, "three", turns=2), timeout=120)
        transcript = (await h.agents.transcript(run)).messages
        counting.release("slow")
        await h.agents.cancel(run)
    inputs = await model_inputs(h, run)
    assert TRANSCRIPT_MISSING not in await failures(h, run)
    assert not any(m.content == "count slowly" for m in transcript)
    last = seen(counting, "count to three")[-1]
    assert sent(last) == wire(transcript[:-1])
    # the first request after the rollback refers to the first turn's stored context
    first = next(
        i for _, i in inputs if any(m.content == "count to three, please" for m in i.messages)
    )
    assert first.base and [m.role for m in first.messages] == ["assistant", "user"]


async def _idle(h: AgentEnvironment, run: str, answer: str, turns: int = 1) -> bool:
    s = await h.agents.get_state(run)
    answers = [m for m in s.transcript if m.role == "assistant" and m.content == answer]
    return s.status == AgentStatus.IDLE and len(answers) >= turns
