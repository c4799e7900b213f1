"""Property-based fuzz (hypothesis) of what reaches a run from outside: decision and message
payloads (signals and updates) and the model's tool arguments.

The pure validators and decoders take thousands of cases; then a few hundred go through real
runs on the dev server, which must neither fail nor hang, accept no forged decision, run no
tool outside the allowlist, and finish normally once a valid decision comes."""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from temporalio.api.enums.v1 import EventType
from temporalio.client import (
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.service import RPCError

from keel.client.signing import sign_decision
from keel.policy_file import PolicyError, parse_policy
from keel.testing.model_server import RuleSet
from keel.workflows.authz import tool_refusal
from keel.workflows.decisions import DecisionTarget, rate_refusal
from keel.workflows.inbox import MAX_QUEUED_MESSAGES, Inbox, message_refusal
from keel.workflows.models import (
    MAX_REFUSALS,
    SIGNAL_DECIDE,
    SIGNAL_MESSAGE,
    UPDATE_DECIDE,
    UPDATE_MESSAGE,
    AgentSpec,
    AgentState,
    AgentStatus,
    ApprovalMode,
    ApprovalPolicy,
    ApprovalRequest,
    AuditKind,
    ChatMessage,
    Condition,
    DecideInput,
    MessageInput,
    MessageReceipt,
    RunState,
)
from keel.workflows.policy import (
    approval_reason,
    parse_arguments,
    short_args,
    validate_arguments,
)
from tests.agents import TOOLS
from tests.conftest import Harness, wait_for
from tests.policies import key_pair, make_policy, policy_data, refuse_decision, target_of
from tests.test_approvals import pending

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
RUN = DecisionTarget("default", "run-1", "first-run-1")
ALICE, MALLORY = key_pair(), key_pair()
POLICY = make_policy({"alice": ALICE, "mallory": MALLORY})
SPEC = AgentSpec(name="guarded", tools=[t.spec for t in TOOLS], policy=POLICY)
CALL = "call_1"  # stands for the pending call's id; replaced by the real one in real runs
CHAT_SPEC = AgentSpec(name="chat", tools=SPEC.tools, policy=POLICY)
OVER_20 = ApprovalPolicy(
    mode=ApprovalMode.WHEN, when=[Condition(field="amount", op=">", value=20)], reason="over 20"
)
PURE = settings(max_examples=600, deadline=None, database=None)


def _state(user: str = "dana") -> AgentState:
    request = ApprovalRequest(
        call_id=CALL,
        tool="charge",
        arguments={"amount": 30, "note": "x"},
        requested_at=NOW - timedelta(minutes=1),
        expires_at=NOW + timedelta(hours=1),
    )
    return AgentState(user=user, status=AgentStatus.WAITING_APPROVAL, pending_approvals=[request])


def json_values(finite: bool = False) -> st.SearchStrategy[Any]:
    scalars = (
        st.none()
        | st.booleans()
        | st.integers()
        | st.floats(allow_nan=not finite, allow_infinity=not finite)
        | st.text(max_size=40)
    )
    return st.recursive(
        scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
        ),
        max_leaves=12,
    )


def _b64(n: int) -> st.SearchStrategy[str]:
    return st.binary(min_size=n, max_size=n).map(lambda b: base64.b64encode(b).decode())


def decision_payloads(finite: bool = False) -> st.SearchStrategy[Any]:
    """Anything at all, and above all what looks like a decision: the real call id, real
    approvers, signatures of the right shape (or not), times near and far."""
    when = st.datetimes(
        min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
    )
    fields = {
        "call_id": st.sampled_from([CALL, "call_2", ""]) | st.text(max_size=300),
        "decision": st.sampled_from(["approve", "reject", "edit"]) | json_values(finite),
        "approver": st.sampled_from(["alice", "dana", "mallory", "eve", ""]) | st.text(),
        "reason": st.text(max_size=100) | json_values(finite),
        "arguments": st.none()
        | st.dictionaries(st.sampled_from(["amount", "note", "x"]), json_values(finite)),
        "signature": _b64(64) | st.text(max_size=120) | json_values(finite),
        "signed_at": when.map(datetime.isoformat) | st.text(max_size=30) | json_values(finite),
    }
    well_formed = st.fixed_dictionaries(
        {
            "call_id": st.just(CALL),
            "decision": st.sampled_from(["approve", "reject", "edit"]),
            "approver": st.sampled_from(["alice", "dana", "mallory", "eve"]),
        },
        optional={
            "reason": st.text(max_size=100),
            "arguments": st.dictionaries(st.sampled_from(["amount", "note"]), json_values(finite)),
            "signature": _b64(64) | st.text(max_size=120),
            "signed_at": when.map(datetime.isoformat),
        },
    )
    shaped = st.fixed_dictionaries({}, optional=fields)
    return st.one_of(well_formed, well_formed, shaped, json_values(finite))


def message_payloads(finite: bool = False) -> st.SearchStrategy[Any]:
    # interrupt and rollback are legitimate requests that stop the turn: not fuzzed here
    shaped = st.fixed_dictionaries(
        {},
        optional={
            "text": st.text(max_size=200) | json_values(finite),
            "policy": st.sampled_from(["queue", "reject", None]) | st.text(max_size=10),
            "sender": st.text(max_size=250),
            "id": st.text(max_size=250) | json_values(finite),
        },
    )
    return shaped | st.text(max_size=200) | json_values(finite)


def tool_arguments() -> st.SearchStrategy[str]:
    valid = st.fixed_dictionaries({"a": st.integers(), "b": st.integers()})
    near = st.dictionaries(st.sampled_from(["a", "b", "amount", "size"]), json_values(True))
    return (
        st.text(max_size=200)
        | json_values(True).map(json.dumps)
        | valid.map(json.dumps)
        | near.map(json.dumps)
    )


# --- the pure doors: thousands of cases ---------------------------------------------------------


@PURE
@given(payload=decision_payloads())
def test_no_forged_decision_is_ever_accepted(payload: Any) -> None:
    """Whatever arrives, deciding never raises, nothing without alice's key holds, judging
    changes nothing, and the refusal names what is wrong."""
    try:
        d = DecideInput.model_validate(payload)
    except ValidationError:
        return  # refused at the door: the signal is recorded as malformed
    state = _state()
    before = state.model_dump()
    assert rate_refusal(state, NOW, POLICY) == ""
    refusal = refuse_decision(SPEC, state, d, NOW, RUN)
    assert refusal != ""
    assert state.model_dump() == before
    if not d.approver.strip():
        assert "approver" in refusal
    elif d.call_id != CALL:
        assert repr(d.call_id) in refusal  # no such pending call: which one was asked for


@settings(max_examples=300, deadline=None, database=None)
@given(
    decision=st.sampled_from(["approve", "reject", "edit"]),
    reason=st.text(max_size=50),
    amount=st.floats(min_value=0.01, max_value=1e6),
    field=st.sampled_from(["call_id", "decision", "approver", "reason", "arguments", "signed_at"]),
    data=st.data(),
)
def test_a_signed_decision_changed_anywhere_is_refused(
    decision: str, reason: str, amount: float, field: str, data: st.DataObject
) -> None:
    arguments = {"amount": amount} if decision == "edit" else None
    d = DecideInput.model_validate(
        {"call_id": CALL, "decision": decision, "approver": "alice", "reason": reason}
        | {"arguments": arguments}
    )
    signed = sign_decision(ALICE.private, d, RUN, NOW)
    state = _state()
    state.pending_approvals.append(state.pending_approvals[0].model_copy(update={"call_id": "c2"}))
    assert refuse_decision(SPEC, state, signed, NOW, RUN) == ""
    other = {
        "call_id": "c2",
        "decision": data.draw(
            st.sampled_from(["approve", "reject", "edit"]).filter(lambda v: v != decision)
        ),
        "approver": "mallory",
        "reason": data.draw(st.text(max_size=50).filter(lambda v: v != reason)),
        "arguments": {"amount": amount + 1},
        "signed_at": NOW - timedelta(microseconds=data.draw(st.integers(1, 10**8))),
    }[field]
    changed = DecideInput.model_validate(signed.model_dump() | {field: other})
    assert refuse_decision(SPEC, state, changed, NOW, RUN) != ""
    for elsewhere in (
        RUN._replace(namespace="other"),
        RUN._replace(workflow_id="run-2"),
        RUN._replace(first_run_id="first-run-2"),
    ):
        assert refuse_decision(SPEC, state, signed, NOW, elsewhere) != ""


@PURE
@given(payloads=st.lists(message_payloads(), min_size=1, max_size=8))
def test_any_message_payload_is_taken_or_refused(payloads: list[Any]) -> None:
    """Each message is queued once, answered as a duplicate, or refused with the reason the
    inbox's judge gives, and a refused one leaves the run as it was but for the audit."""
    state = _state()
    state.transcript = [ChatMessage(role="system", content="")]
    inbox = Inbox(state)
    for payload in payloads:
        try:
            m = MessageInput.model_validate(
                {"text": payload} if isinstance(payload, str) else payload
            )
        except ValidationError:
            continue
        refusal = message_refusal(SPEC, state, m)
        seen = bool(m.id) and m.id in state.message_ids
        before = state.model_dump(exclude={"audit", "audit_dropped"})
        receipt = inbox.accept(SPEC, m, NOW)
        if seen:
            assert receipt.status == "duplicate" and m.id in receipt.reason
        elif refusal:
            assert (receipt.status, receipt.reason) == ("rejected", refusal)
        else:
            assert receipt.status == "queued"  # a turn is in flight: it waits for the step
            assert state.queued_messages[-1].text == m.text
            continue
        assert state.model_dump(exclude={"audit", "audit_dropped"}) == before
    assert len(state.queued_messages) <= MAX_QUEUED_MESSAGES
    assert (
        sum(e.kind in ("message_rejected", "message_duplicate") for e in state.audit)
        <= MAX_REFUSALS
    )
    assert state.pending_approvals[0].call_id == CALL  # nothing a message does decides


@settings(max_examples=1000, deadline=None, database=None)
@given(raw=tool_arguments(), index=st.integers(0, len(TOOLS) - 1), name=st.text(max_size=20))
def test_any_tool_arguments_are_judged_without_raising(raw: str, index: int, name: str) -> None:
    """Whatever the model writes: the summary is a bounded prefix of the whole, only the
    tools the policy allows run, arguments the schema accepts are ones the tool's model
    takes, and a call its approval condition cannot judge goes to a person."""
    whole = short_args(raw, limit=10**6)
    short = short_args(raw)
    assert short == whole if len(whole) <= 60 else short == whole[:59] + "…"
    refusal = tool_refusal(CHAT_SPEC, name)  # the policy lets `chat` use `add` only
    assert (refusal == "") == (name == "add")
    assert refusal == "" or (repr(name) in refusal and "not run" in refusal)
    args, problem = parse_arguments(raw)
    if args is None:
        assert problem
        return
    if validate_arguments(SPEC.tools[index], args) == "":
        TOOLS[index].args_model.model_validate(args)  # raises if the tool could not take them
    reason = approval_reason(SPEC.tools[index].model_copy(update={"approval": OVER_20}), args)
    try:
        judged_safe = "amount" in args and not args["amount"] > 20
    except TypeError:
        judged_safe = False  # cannot be compared: fails closed
    assert (reason is None) == judged_safe


@settings(max_examples=300, deadline=None, database=None)
@given(
    data=st.dictionaries(
        st.sampled_from(["id", "users", "roles", "tools", "agents", "four_eyes", "x"]),
        json_values(),
        max_size=4,
    )
)
def test_any_policy_file_loads_or_is_refused_clearly(data: dict[str, Any]) -> None:
    try:
        policy = parse_policy(data)
    except PolicyError as e:
        assert str(e).startswith("invalid policy")
        return
    assert len(policy.digest) == 64


# --- real runs: a few hundred payloads through the doors of live runs --------------------------


def _draw(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    """n examples of a strategy (hypothesis's own generation, edge cases first)."""
    out: list[Any] = []

    @settings(
        max_examples=n,
        database=None,
        deadline=None,
        phases=[Phase.generate],
        derandomize=True,
        suppress_health_check=list(HealthCheck),
    )
    @given(strategy)
    def collect(value: Any) -> None:
        out.append(value)

    collect()
    return out


def _at_run(value: Any, call_id: str, target: DecisionTarget, i: int) -> Any:
    """A payload aimed at the run's pending call; every third such one signed the way a
    forger could: by someone without the role, or by alice for another run."""
    if not isinstance(value, dict) or value.get("call_id") != CALL:
        return value
    value = value | {"call_id": call_id}
    if i % 3:
        return value
    try:
        d = DecideInput.model_validate(value)
    except ValidationError:
        return value
    elsewhere = target._replace(first_run_id="another-run")
    who, key, target = [("mallory", MALLORY, target), ("alice", ALICE, elsewhere)][i % 2]
    d = d.model_copy(update={"approver": who})
    return sign_decision(key.private, d, target, datetime.now(UTC)).model_dump(mode="json")


async def _update(h: Harness, run: str, name: str, payload: Any) -> MessageReceipt | None:
    """Send one update; None when it is refused. A run in the middle of continuing as new
    may not take it: then it is sent again."""
    handle = h.client.get_workflow_handle(run)
    for _ in range(5):
        try:
            return await handle.execute_update(name, payload, result_type=MessageReceipt)
        except WorkflowUpdateFailedError:
            return None
        except (RPCError, WorkflowUpdateRPCTimeoutOrCancelledError):
            continue
    raise AssertionError(f"run {run} did not answer the update {name}")


async def _no_task_failed(h: Harness, run: str) -> None:
    history = await h.client.get_workflow_handle(run).fetch_history()
    failed = EventType.EVENT_TYPE_WORKFLOW_TASK_FAILED
    assert not [e for e in history.events if e.event_type == failed]


async def test_fuzzed_signals_and_updates_leave_a_live_run_unharmed(harness: Harness) -> None:
    data = policy_data({"alice": ALICE, "mallory": MALLORY}, decision_burst=100_000)
    data["roles"]["customer"]["agents"].append("chat-long")
    data["agents"]["chat-long"] = {"tools": ["add"]}
    policy = parse_policy(data)
    names = st.sampled_from(["add", "add", "charge", "blob", "nope"]) | st.text(max_size=20)
    drawn = _draw(st.tuples(names, tool_arguments()), 200)
    batches = [drawn[i : i + 40] for i in range(0, len(drawn), 40)]
    rules = [
        {
            "name": "charge",
            "when": {"last_role": "user", "last_user": "^FUZZ-CHARGE$"},
            "reply": {"tool_calls": [{"name": "charge", "arguments": {"amount": 30}}]},
        },
        *(
            {
                "name": f"arguments {i}",
                "when": {"last_role": "user", "last_user": f"^FUZZ-ARGS-{i}$"},
                "reply": {"tool_calls": [{"name": n, "raw_arguments": a} for n, a in batch]},
            }
            for i, batch in enumerate(batches)
        ),
        {"name": "after tools", "when": {"last_role": "tool"}, "reply": {"content": "done"}},
    ]
    harness.model.set_rules(RuleSet.from_dict({"rules": rules, "default": {"content": "ok"}}))
    a = harness.agents
    async with harness.worker(policy=policy):
        run = await harness.start("guarded-open", "FUZZ-CHARGE", user="dana")
        call = (await pending(harness, run)).pending_approvals[0].call_id
        handle = harness.client.get_workflow_handle(run)
        target = await target_of(harness.client, run)
        for i, payload in enumerate(_draw(decision_payloads(finite=True), 150)):
            await handle.signal(SIGNAL_DECIDE, _at_run(payload, call, target, i))
        for payload in _draw(message_payloads(finite=True), 100):
            await handle.signal(SIGNAL_MESSAGE, payload)
        for i, payload in enumerate(_draw(decision_payloads(finite=True), 80)):
            answer = await _update(harness, run, UPDATE_DECIDE, _at_run(payload, call, target, i))
            assert answer is None  # refused
        for payload in _draw(message_payloads(finite=True), 40):
            await _update(harness, run, UPDATE_MESSAGE, payload)

        # the model's tool arguments, a batch of calls per turn, in another run
        chat = await harness.start("chat-long", "say hello", user="dana")
        await a.result(chat, timeout=30)
        for i in range(len(batches)):
            receipt = await a.send_message(chat, f"FUZZ-ARGS-{i}")
            assert receipt.status == "delivered", receipt
            result = await a.result(chat, timeout=60)
            assert result.status == AgentStatus.IDLE and result.final_answer == "done"
        chat_state = await a.get_state(chat)

        # every forged decision was refused: the approval waits as it did
        state = await a.get_state(run)
        assert state.status == AgentStatus.WAITING_APPROVAL and state.decisions == []
        assert [r.call_id for r in state.pending_approvals] == [call]
        assert harness.ledger.rows("refunds") == []
        # and a valid decision still goes through
        assert (await a.approve(run, call, "alice", signing_key=ALICE.private)).accepted
        state = await wait_for(lambda: _idle(harness, run))
        await _no_task_failed(harness, run)
        await _no_task_failed(harness, chat)
        await a.cancel(run)
        await a.cancel(chat)
    assert [(d.by, d.signed) for d in state.decisions] == [("alice", True)]
    assert [r["amount"] for r in harness.ledger.rows("refunds")] == [30]  # charge ran once
    # each fuzzed call got exactly one result; none outside the allowlist ran
    calls = [c.id for m in chat_state.transcript for c in m.tool_calls]
    results = [m.tool_call_id for m in chat_state.transcript if m.role == "tool"]
    assert sorted(calls) == sorted(results) and len(calls) == sum(map(len, batches))
    assert chat_state.effects == []
    refused = [e for e in chat_state.audit if e.kind == AuditKind.TOOL_REFUSED]
    assert len(refused) == min(sum(n != "add" for b in batches for n, _ in b), MAX_REFUSALS)


async def _idle(h: Harness, run: str) -> RunState | None:
    state = await h.agents.get_state(run)
    return state if state.status == AgentStatus.IDLE else None
