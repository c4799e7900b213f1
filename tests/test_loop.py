"""The durable loop end to end: real dev server, scripted model over HTTP."""

from __future__ import annotations

import asyncio

import pytest
from temporalio.api.enums.v1 import EventType

from keel.workflows.models import AGENT_STEPS, TOTAL_TOKENS, AgentStatus
from tests.conftest import Harness


async def activity_summaries(h: Harness, run_id: str) -> list[str]:
    history = await h.client.get_workflow_handle(run_id).fetch_history()
    out = []
    for e in history.events:
        if e.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED:
            out.append(
                h.client.data_converter.payload_converter.from_payload(e.user_metadata.summary)
            )
    return out


async def test_run_completes_with_tool_call(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "Please add 2 and 3")
        result = await harness.agents.result(run, timeout=60)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    assert result.final_answer == "The sum is 5."
    roles = [m.role for m in state.transcript]
    assert roles == ["system", "user", "assistant", "tool", "assistant"]
    assert state.step == 2 and state.usage.total_tokens > 0
    summaries = await activity_summaries(harness, run)
    assert summaries == ["model scripted · step 1", "tool add(a=2, b=3)", "model scripted · step 2"]
    assert harness.model.stats()["served"] == 2


async def test_transient_provider_faults_are_retried(harness: Harness) -> None:
    # 429 with Retry-After, a 500, a reply slower than the client timeout: each retried.
    harness.model.set_faults(
        [
            {"kind": "429", "count": 1, "retry_after": 1},
            {"kind": "500", "count": 1},
            {"kind": "slow", "count": 1, "delay": 5},
            {"kind": "malformed", "count": 1},
        ]
    )
    async with harness.running():
        run = await harness.start("fast", "add 4 and 5")
        result = await harness.agents.result(run, timeout=90)
    assert result.status == AgentStatus.COMPLETED
    assert result.final_answer == "The sum is 9."
    stats = harness.model.stats()
    assert stats["faults"] == 4 and stats["served"] == 2
    outcomes = [r["outcome"] for r in harness.model.requests()]
    assert outcomes[:4] == ["fault:429", "fault:500", "fault:slow", "fault:malformed"]


async def test_bad_model_output_goes_back_to_the_model(harness: Harness) -> None:
    async with harness.running():
        runs = {
            text: await harness.start("calc", text)
            for text in ("call unknown tool", "bad args", "broken json")
        }
        results = {t: await harness.agents.result(r, timeout=60) for t, r in runs.items()}
    for text, result in results.items():
        assert result.status == AgentStatus.COMPLETED, text
        assert (result.final_answer or "").startswith("The tool reported: Error"), text
    assert "no tool named 'no_such_tool'" in (results["call unknown tool"].final_answer or "")
    assert "'b' is a required property" in (results["bad args"].final_answer or "")
    assert "not valid JSON" in (results["broken json"].final_answer or "")


@pytest.mark.parametrize("text", ["quirky", "quirky without ids"])
async def test_compatible_server_quirks_are_tolerated(harness: Harness, text: str) -> None:
    # content beside tool calls and two calls sharing one id; or calls with no id at all
    async with harness.running():
        run = await harness.start("calc", text)
        result = await harness.agents.result(run, timeout=60)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED
    calls = state.transcript[2].tool_calls
    assert len({c.id for c in calls}) == 2
    tool_ids = [m.tool_call_id for m in state.transcript if m.role == "tool"]
    assert tool_ids == [c.id for c in calls]


async def test_failing_tool_is_retried_by_its_policy(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "try the flaky tool")
        result = await harness.agents.result(run, timeout=60)
    assert result.final_answer == 'Done: {"result": 3}'


async def test_step_budget(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("steps", "loop forever")
        result = await harness.agents.result(run, timeout=60)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.BUDGET_EXHAUSTED
    assert "step budget" in (result.error or "")
    assert state.step == 3 and len([m for m in state.transcript if m.role == "tool"]) == 3


async def test_token_budget(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("tokens", "loop forever")
        result = await harness.agents.result(run, timeout=60)
    assert result.status == AgentStatus.BUDGET_EXHAUSTED
    assert "token budget" in (result.error or "")
    assert result.usage.total_tokens >= 150


async def test_time_budget(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("clock", "slow loop")
        result = await harness.agents.result(run, timeout=60)
    assert result.status == AgentStatus.BUDGET_EXHAUSTED
    assert "time budget" in (result.error or "")
    assert result.steps >= 2


async def test_unknown_agent_fails_clearly(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("nobody", "hi")
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.FAILED
    # the run's own record agrees (KeelError is one class inside and outside the sandbox)
    assert state.status == AgentStatus.FAILED and "unknown agent" in (state.error or "")
    assert "unknown agent 'nobody'" in (result.error or "") and "calc" in (result.error or "")


async def test_arguments_are_checked_before_policy_and_tools_are_the_agents_own(
    harness: Harness,
) -> None:
    async with harness.running():
        # "100" as a string would pass pydantic's lax mode but slip past `amount > 20`
        sneaky = await harness.start("shop", "charge as text")
        # a tool the worker has, but this agent does not
        foreign = await harness.start("adder", "charge 50")
        sneaky_result = await harness.agents.result(sneaky, timeout=30)
        foreign_result = await harness.agents.result(foreign, timeout=30)
    assert "invalid arguments for charge: amount" in (sneaky_result.final_answer or "")
    assert "no tool named 'charge'. Available tools: add." in (foreign_result.final_answer or "")
    assert harness.ledger.rows("refunds") == []


async def test_a_client_cannot_forge_the_spec(harness: Harness) -> None:
    from keel.workflows.agent import AgentWorkflow
    from keel.workflows.models import AgentInput, AgentSpec, AgentState

    forged = AgentState(agent="shop", spec=AgentSpec(name="shop"))  # no tools, no approvals
    run = f"forged-{harness.settings.task_queue}"
    async with harness.running():
        await harness.client.start_workflow(
            AgentWorkflow.run,
            AgentInput(agent="shop", message="charge 500", carry=forged),
            id=run,
            task_queue=harness.settings.task_queue,
        )
        result = await harness.agents.result(run, timeout=30)
    assert result.status == AgentStatus.FAILED
    assert "continue-as-new" in (result.error or "")
    assert harness.model.stats()["requests"] == 0


async def test_many_runs_through_a_flaky_provider(harness: Harness) -> None:
    # a third of all requests fail (500s and 429s), at random but seeded: every run completes
    harness.model.set_faults(
        [
            {"kind": "500", "rate": 0.2, "seed": 7},
            {"kind": "429", "rate": 0.15, "seed": 11, "retry_after": 0.2},
        ]
    )
    async with harness.running():
        runs = {n: await harness.start("calc", f"add {n} and {n}") for n in range(8)}
        results = await asyncio.gather(
            *(harness.agents.result(r, timeout=120) for r in runs.values())
        )
    assert [r.final_answer for r in results] == [f"The sum is {2 * n}." for n in runs]
    stats = harness.model.stats()
    assert stats["faults"] > 0 and stats["served"] == 2 * len(runs)


async def test_any_openai_compatible_server_from_the_environment(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """OPENAI_BASE_URL / OPENAI_API_KEY / KEEL_MODEL route every agent to that server."""
    from keel.config import Settings
    from keel.plugin import build_worker

    monkeypatch.setenv("OPENAI_BASE_URL", harness.model.url)
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("KEEL_MODEL", "llama3.1")
    monkeypatch.setenv("KEEL_TASK_QUEUE", harness.settings.task_queue)
    settings = Settings.from_env()
    assert not settings.uses_scripted_model
    from tests.agents import TEST_AGENTS

    async with build_worker(harness.client, settings=settings, agents=TEST_AGENTS):
        run = await harness.start("calc", "say hello")
        result = await harness.agents.result(run, timeout=30)
    assert result.final_answer == "Hello!"
    (request,) = harness.model.requests()
    assert request["body"]["model"] == "llama3.1"
    summaries = await activity_summaries(harness, run)
    assert summaries == ["model llama3.1 · step 1"]


async def test_status_costs_no_upsert_per_step_and_is_right_at_the_end(
    harness: Harness,
) -> None:
    """An upsert is a history event and a visibility write: a six-step turn makes a few
    (status changes), not two per step; steps and tokens are published when it ends."""
    async with harness.running():
        run = await harness.start("six", "loop forever")
        result = await harness.agents.result(run, timeout=60)
        handle = harness.client.get_workflow_handle(run)
        described = await handle.describe()
        history = await handle.fetch_history()
    upserts = [
        set(e.upsert_workflow_search_attributes_event_attributes.search_attributes.indexed_fields)
        for e in history.events
        if e.event_type == EventType.EVENT_TYPE_UPSERT_WORKFLOW_SEARCH_ATTRIBUTES
    ]
    keels = [u for u in upserts if u != {"TemporalChangeVersion"}]  # (patch markers aside)
    assert result.steps == 6 and len(keels) == 2  # was 13: two per step, and the end
    sa = described.typed_search_attributes
    assert sa.get(AGENT_STEPS) == 6 and sa.get(TOTAL_TOKENS) == result.usage.total_tokens
