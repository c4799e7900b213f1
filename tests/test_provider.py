"""A model provider that fails: runs wait instead of failing, fall back to other models, and
fail at once only when the request itself is wrong (or Keel's own code is)."""

from __future__ import annotations

import pytest

import keel.activities.model as model_activity
from keel.workflows.models import AgentStatus
from tests.conftest import Harness, wait_for
from tests.test_cli import keel


async def status_is(h: Harness, run: str, status: AgentStatus, error: str = "") -> object:
    s = await h.agents.get_state(run)
    return s if s.status == status and error in s.provider_error else None


async def test_an_outage_longer_than_any_retry_policy_waits_and_the_run_completes(
    harness: Harness,
) -> None:
    harness.model.set_faults([{"kind": "500", "count": 10_000}])
    async with harness.running():
        run = await harness.start("patient", "say hello")
        state = await wait_for(lambda: status_is(harness, run, AgentStatus.WAITING_PROVIDER, "500"))
        # far more attempts than one activity's retry policy, and the run is still going
        await wait_for(lambda: harness.model.stats()["faults"] >= 12)
        listed = await wait_for(lambda: _listed(harness, run, "waiting_provider"))
        harness.model.set_faults([])  # the outage ends
        result = await harness.agents.result(run, timeout=60)
        state = await harness.agents.get_state(run)
    assert listed.status == "waiting_provider"
    assert result.status == AgentStatus.COMPLETED and result.final_answer == "Hello!"
    assert state.provider_error == "" and state.step == 1


async def test_cancelling_a_run_that_waits_on_its_provider(harness: Harness) -> None:
    harness.model.set_faults([{"kind": "503", "count": 10_000}])
    async with harness.running():
        run = await harness.start("patient", "say hello")
        await wait_for(lambda: status_is(harness, run, AgentStatus.WAITING_PROVIDER, "503"))
        await harness.agents.cancel(run)
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.CANCELLED and state.status == AgentStatus.CANCELLED


async def _listed(h: Harness, run: str, status: str) -> object:
    return next((r for r in await h.agents.list(status=status) if r.run_id == run), None)


async def test_a_refused_key_waits_until_an_operator_resumes_the_run(harness: Harness) -> None:
    harness.model.set_faults([{"kind": "401", "count": 10_000}])
    async with harness.running():
        run = await harness.start("patient", "say hello")
        await wait_for(lambda: status_is(harness, run, AgentStatus.WAITING_PROVIDER, "401"))
        assert harness.model.stats()["requests"] == 1  # a refused key is not hammered
        harness.model.set_faults([])  # the key is fixed
        code, out, err = await keel(harness, "resume", run)
        assert code == 0, err
        result = await harness.agents.result(run, timeout=60)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.COMPLETED and result.final_answer == "Hello!"
    assert harness.model.stats()["requests"] == 2
    assert [a.kind for a in state.audit] == ["resume"]


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "400", "count": 100},
        # some compatible servers answer 500 to a request they cannot take
        {"kind": "500", "count": 100, "message": "Invalid request: 'content' must be a string"},
        {"kind": "500", "count": 100, "should_retry": False},
    ],
    ids=["400", "500 saying invalid request", "x-should-retry false"],
)
async def test_a_request_the_provider_cannot_take_fails_at_once(
    harness: Harness, fault: dict
) -> None:  # type: ignore[type-arg]
    harness.model.set_faults([fault])
    async with harness.running():
        run = await harness.start("patient", "say hello")
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.FAILED and state.status == AgentStatus.FAILED
    assert harness.model.stats()["requests"] == 1


async def test_overload_and_a_missing_model_go_to_the_fallback(harness: Harness) -> None:
    harness.model.set_faults(
        [
            {"kind": "503", "count": 10_000, "when": {"model": "^primary$", "any_user": "one"}},
            {"kind": "404", "count": 10_000, "when": {"model": "^primary$", "any_user": "two"}},
        ]
    )
    async with harness.running():
        runs = [await harness.start("falling-back", f"add {n} and 1 (one)") for n in (1,)]
        runs.append(await harness.start("falling-back", "add 2 and 1 (two)"))
        results = [await harness.agents.result(r, timeout=60) for r in runs]
        states = [await harness.agents.get_state(r) for r in runs]
    assert [r.final_answer for r in results] == ["The sum is 2.", "The sum is 3."]
    for state in states:
        answered = [m.model for m in state.transcript if m.role == "assistant"]
        assert answered == ["backup", "backup"]  # the record says which model answered
        assert [a.kind for a in state.audit] == ["model_fallback", "model_fallback"]
    to_primary = [r for r in harness.model.requests() if r["body"]["model"] == "primary"]
    # overloaded: one activity's quick retries per step; gone: one request per step
    assert sum(1 for r in to_primary if "(two)" in str(r["body"]["messages"])) == 2
    assert sum(1 for r in to_primary if "(one)" in str(r["body"]["messages"])) == 4


async def test_an_empty_reply_gets_one_corrective_turn_then_a_clear_ending(
    harness: Harness,
) -> None:
    async with harness.running():
        once = await harness.start("calc", "say nothing")
        always = await harness.start("calc", "stay silent")
        once_result = await harness.agents.result(once, timeout=30)
        always_result = await harness.agents.result(always, timeout=30)
        always_state = await harness.agents.get_state(always)
    assert once_result.status == AgentStatus.COMPLETED
    assert (once_result.final_answer or "").startswith("You said: Your last reply was empty")
    assert always_result.status == AgentStatus.FAILED and always_result.steps == 2
    assert "nothing, twice" in (always_result.error or "")
    assert always_state.status == AgentStatus.FAILED


async def test_a_bug_in_keel_is_not_blamed_on_the_provider_nor_retried(
    harness: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(messages: object) -> object:
        raise TypeError("a bug in Keel's own code")

    monkeypatch.setattr(model_activity, "to_openai_messages", broken)
    async with harness.running():
        run = await harness.start("patient", "say hello")
        result = await harness.agents.result(run, timeout=30)
        state = await harness.agents.get_state(run)
    assert result.status == AgentStatus.FAILED and state.status == AgentStatus.FAILED
    assert "Keel could not build the model request" in (state.error or "")
    assert "a bug in Keel's own code" in (result.error or "")
    assert harness.model.stats()["requests"] == 0


async def test_what_every_compatible_server_accepts_is_sent(harness: Harness) -> None:
    async with harness.running():
        run = await harness.start("calc", "add 2 and 3")
        await harness.agents.result(run, timeout=30)
    first, second = (r["body"] for r in harness.model.requests())
    assert first["tool_choice"] == "auto" and first["tools"]
    assistant = second["messages"][2]
    assert assistant["role"] == "assistant" and assistant["tool_calls"]
    assert assistant["content"] == ""  # not null: llama.cpp's server refuses null
