"""The policy and signed decisions as pure functions, without a server."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keel.activities.registry import AgentRegistry, load_policy
from keel.client.signing import sign_decision
from keel.client.visibility import visibility_query
from keel.policy_file import PolicyError, parse_policy, public_key_text
from keel.workflows.authz import allowed_tools, effective_limits, start_refusal, tool_refusal
from keel.workflows.decisions import (
    DecisionTarget,
    decision_tokens,
    judge,
    rate_refusal,
    spend_decision,
)
from keel.workflows.models import (
    AgentSpec,
    AgentState,
    ApprovalRequest,
    DecideInput,
    Decision,
    Limits,
    LoadAgentInput,
    Policy,
    ToolSpec,
)
from keel.workflows.policy import budget_exhausted
from tests.agents import TEST_AGENTS
from tests.policies import BASE, KeyPair, key_pair, make_policy, policy_data

NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
RUN = DecisionTarget("default", "run-1", "first-run-1")
CHARGE = ToolSpec(name="charge", side_effects=True)
ADD = ToolSpec(name="add")
KEYS = {name: key_pair() for name in ("alice", "dana", "mallory")}


def _spec(policy: Policy | None, **kw: object) -> AgentSpec:
    return AgentSpec(name="guarded", tools=[CHARGE, ADD], policy=policy, **kw)  # type: ignore[arg-type]


def _state(user: str = "dana", tool: str = "charge") -> AgentState:
    req = ApprovalRequest(
        call_id="call_1",
        tool=tool,
        arguments={"amount": 30},
        requested_at=NOW - timedelta(minutes=1),
        expires_at=NOW + timedelta(hours=1),
    )
    return AgentState(user=user, pending_approvals=[req])


def _signed(
    who: str = "alice",
    key: KeyPair | None = None,
    *,
    run: DecisionTarget = RUN,
    at: datetime = NOW,
    **kw: object,
) -> DecideInput:
    fields: dict[str, object] = {"call_id": "call_1", "decision": "approve", "approver": who}
    d = DecideInput.model_validate(fields | kw)
    return sign_decision((key or KEYS[who]).private, d, run, at)


def _refusal(policy: Policy | None, d: DecideInput, state: AgentState | None = None) -> str:
    return judge(_spec(policy), state or _state(), d, NOW, RUN).refusal


def test_a_policy_file_loads_with_its_digest(tmp_path: Path) -> None:
    toml = tmp_path / "policy.toml"
    toml.write_text(
        'id = "prod"\nfour_eyes = true\n\n[users.alice]\nroles = ["lead"]\n'
        f'public_key = "{KEYS["alice"].public}"\n\n[roles.lead]\nagents = ["*"]\n\n'
        '[tools.charge]\napprovers = ["lead"]\n'
    )
    policy = load_policy(toml)
    assert policy.id == "prod" and policy.users["alice"].public_key == KEYS["alice"].public
    assert len(policy.digest) == 64
    # the same policy as JSON has the same digest; any change gives another one
    as_json = tmp_path / "policy.json"
    as_json.write_text(json.dumps(policy.model_dump(mode="json", exclude={"digest"})))
    assert load_policy(as_json).digest == policy.digest
    toml.write_text(toml.read_text().replace("four_eyes = true", "four_eyes = false"))
    assert load_policy(toml).digest != policy.digest


@pytest.mark.parametrize(
    ("change", "error"),
    [
        ({"unsigned": "allowed"}, "unknown key"),
        ({"users": {"x": {"role": ["a"]}}}, "unknown key"),
        ({"users": {"x": {"roles": ["nope"]}}}, "names role 'nope', which is not defined"),
        ({"tools": {"charge": {"approvers": ["boss"]}}}, "tools.charge.approvers names role"),
        ({"users": {"x": {"public_key": "not a key"}}}, "users.x.public_key: not base64"),
        ({"users": {"x": {"public_key": "AAAA"}}}, "32 bytes"),
        ({"unsigned_decisions": "refused"}, "no decision could ever be accepted"),
        ({"digest": "abc"}, "computed when it is loaded"),
    ],
)
def test_a_bad_policy_is_refused_clearly(change: dict[str, object], error: str) -> None:
    with pytest.raises(PolicyError, match=error):
        parse_policy(policy_data(**change))


def test_keys_in_any_usual_form(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    pem = (
        KEYS["alice"]
        .private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    raw = KEYS["alice"].public
    assert public_key_text(pem) == public_key_text(f"ed25519:{raw}") == raw
    bad = tmp_path / "p.toml"
    bad.write_text("[users.x\n")
    with pytest.raises(PolicyError, match="not valid toml"):
        load_policy(bad)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing.toml")


def test_who_may_start_what() -> None:
    policy = make_policy()
    assert start_refusal(policy, "guarded", "dana") == ""
    assert start_refusal(policy, "anything", "root") == ""  # "*"
    assert start_refusal(policy, "six", "dana") == ""  # as an approver ("*")
    assert start_refusal(policy, "six", "sam") == (
        "user 'sam' may not start agent 'six': policy test-policy "
        f"({policy.digest[:12]}) gives roles customer; the roles that may: admin, approver"
    )
    assert "a run without a user may not start" in start_refusal(policy, "calc", "")
    # users it does not name get default_roles; a policy without roles restricts nothing
    assert start_refusal(make_policy(default_roles=["customer"]), "calc", "") == ""
    assert start_refusal(make_policy(roles={}, users={}, tools={}), "six", "") == ""
    assert start_refusal(None, "six", "") == ""


def test_tools_an_agent_may_use() -> None:
    policy = make_policy()
    tools = [ADD, CHARGE, ToolSpec(name="slow_lookup")]
    assert [t.name for t in allowed_tools(policy, "calc", tools)] == ["add", "slow_lookup"]
    assert allowed_tools(policy, "guarded", tools) == tools  # no entry: all its own
    spec = AgentSpec(name="calc", policy=policy)
    assert "the tool 'charge' is not allowed for agent 'calc' by policy test-policy" in (
        tool_refusal(spec, "charge")
    )
    assert tool_refusal(spec, "add") == "" and tool_refusal(AgentSpec(name="calc"), "x") == ""


async def test_the_spec_snapshot_holds_the_policy_and_only_allowed_tools() -> None:
    policy = make_policy()
    registry = AgentRegistry(TEST_AGENTS, policy=policy)
    spec = await registry.load_agent_spec(LoadAgentInput(agent="calc"))
    assert [t.name for t in spec.tools] == ["add", "slow_lookup"]
    assert spec.policy is not None and spec.policy.digest == policy.digest
    unguarded = await AgentRegistry(TEST_AGENTS).load_agent_spec(LoadAgentInput(agent="calc"))
    assert unguarded.policy is None and len(unguarded.tools) > 2
    with pytest.raises(PolicyError, match="agents.calc.tools names nope"):
        AgentRegistry(TEST_AGENTS, policy=make_policy(agents={"calc": {"tools": ["nope"]}}))


def test_role_limits_lower_the_agents() -> None:
    policy = make_policy(users={**BASE["users"], "fru": {"roles": ["frugal"]}})
    spec = AgentSpec(name="chat", limits=Limits(max_steps=10, max_tokens=500), policy=policy)
    assert effective_limits(spec, "fru").max_steps == 1
    assert effective_limits(spec, "dana") == spec.limits  # a role without a limit
    assert "step budget spent: 1 of 1" in budget_exhausted(
        spec, AgentState(user="fru", step=1), NOW
    )
    assert budget_exhausted(spec, AgentState(user="dana", step=1), NOW) == ""


def test_a_signed_decision_holds_only_as_signed() -> None:
    policy = make_policy(KEYS)
    assert _refusal(policy, _signed()) == ""
    edit = _signed(decision=Decision.EDIT, arguments={"amount": 25})
    assert _refusal(policy, edit) == ""
    forged = {
        "unsigned": DecideInput(call_id="call_1", decision=Decision.APPROVE, approver="alice"),
        "wrong key": _signed("alice", KEYS["mallory"]),
        "tampered arguments": edit.model_copy(update={"arguments": {"amount": 2500}}),
        "tampered decision": _signed().model_copy(update={"decision": Decision.EDIT}),
        "another approver": _signed().model_copy(update={"approver": "dana"}),
        "another call": _signed().model_copy(update={"call_id": "call_2"}),
        "another run": _signed(run=RUN._replace(workflow_id="run-2")),
        "a later run of the same id": _signed(run=RUN._replace(first_run_id="first-run-2")),
        "another namespace": _signed(run=RUN._replace(namespace="other")),
        "in the future": _signed(at=NOW + timedelta(minutes=10)),
        "before the request": _signed(at=NOW - timedelta(hours=1)),
        "no time": _signed().model_copy(update={"signed_at": None}),
        "bad signature": _signed().model_copy(update={"signature": "%%%"}),
    }
    state = _state()
    state.pending_approvals.append(
        state.pending_approvals[0].model_copy(update={"call_id": "call_2"})
    )
    for name, d in forged.items():
        assert _refusal(policy, d, state), name
    assert "unsigned decision refused" in _refusal(policy, forged["unsigned"])
    assert "does not verify" in _refusal(policy, forged["tampered arguments"])
    assert "before this approval was asked for" in _refusal(policy, forged["before the request"])


def test_unsigned_decisions_only_where_the_policy_says() -> None:
    unsigned = DecideInput(call_id="call_1", decision=Decision.APPROVE, approver="alice")
    assert _refusal(make_policy(), unsigned) == ""  # no keys at all: the demo's way
    assert "unsigned decision refused" in _refusal(make_policy(KEYS), unsigned)
    assert _refusal(make_policy(KEYS, unsigned_decisions="allowed"), unsigned) == ""
    assert _refusal(None, unsigned) == ""  # no policy: as before
    # with a key, a signature is checked even where unsigned ones pass
    lax = make_policy(KEYS, unsigned_decisions="allowed")
    assert "does not verify" in _refusal(lax, _signed("alice", KEYS["dana"]))


def test_only_the_roles_named_may_decide_and_four_eyes() -> None:
    policy = make_policy(KEYS)
    assert "'mallory' (roles: customer) may not decide calls of charge" in _refusal(
        policy, _signed("mallory")
    )
    stranger = DecideInput(call_id="call_1", decision=Decision.APPROVE, approver="eve")
    assert "'eve' is not a user of policy" in _refusal(make_policy(), stranger)
    # dana started the run: she may reject her own side effect, not approve it
    assert "four-eyes: 'dana' started this run" in _refusal(policy, _signed("dana"))
    assert _refusal(policy, _signed("dana", decision=Decision.REJECT)) == ""
    assert _refusal(policy, _signed("dana"), _state(user="sam")) == ""
    assert _refusal(make_policy(KEYS, four_eyes=False), _signed("dana")) == ""
    # a call without side effects is not what four-eyes guards
    tools = {"charge": {"approvers": ["approver"]}, "add": {"approvers": ["approver"]}}
    assert _refusal(make_policy(KEYS, tools=tools), _signed("dana"), _state(tool="add")) == ""


def test_decisions_per_second() -> None:
    policy = make_policy(decisions_per_second=2, decision_burst=3)
    st = AgentState()
    for _ in range(3):
        assert rate_refusal(st, NOW, policy) == ""
        spend_decision(st, NOW, policy)
    assert "too many decisions: this run takes 3 at once and 2 a second" in rate_refusal(
        st, NOW, policy
    )
    spend_decision(st, NOW, policy)  # one refused does not push the window further
    assert rate_refusal(st, NOW + timedelta(seconds=0.5), policy) == ""
    assert decision_tokens(st, NOW + timedelta(hours=1), policy) == 3  # never past the burst
    assert rate_refusal(AgentState(), NOW, None) == ""  # the default bucket, without a policy


def test_who_sees_which_runs() -> None:
    policy = make_policy()
    assert visibility_query(policy, "sam") == " AND AgentUser = 'sam'"
    assert visibility_query(policy, "alice") == (
        " AND (AgentTenant = 'acme' OR AgentUser IN ('alice', 'dana', 'mallory', 'sam'))"
    )
    assert visibility_query(policy, "root") == ""
    assert visibility_query(None, "sam") == " AND AgentUser = 'sam'"
    with pytest.raises(PolicyError, match="quotes"):
        visibility_query(policy, "x' OR '1'='1")
