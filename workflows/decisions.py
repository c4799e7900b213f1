"""Judging a person's decision on a pending approval: one function, one verdict.

`judge` is the only place that decides whether a decision applies: the run's state (is the
call open, decided, expired), the rate of decisions, the policy (signature, roles,
four-eyes) and, for an edit, the arguments the call would run with (merged here, once). The
update validator refuses with the verdict's reason; the handler applies the verdict. Pure
functions: no I/O, no clock (`now` is the workflow's).

A decision is signed with the approver's ed25519 key over `decision_message`: canonical JSON
(sorted keys, no whitespace, ASCII) of the run it is for (namespace, workflow id and the id of
the first run of its chain, which continue-as-new keeps and a new run under the same workflow
id does not), the call id, the decision, the edit's arguments, the approver, the reason and
the time of signing. The run verifies it against the approver's public key in its own policy,
so a signature made for another call or another run, or over other arguments, does not
verify there. Clients sign with `keel.client.signing.sign_decision`.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from keel.workflows.authz import policy_label, roles_of
from keel.workflows.models import (
    DECISION_BURST,
    DECISIONS_PER_SECOND,
    AgentSpec,
    AgentState,
    ApprovalRequest,
    DecideInput,
    Decision,
    Policy,
    UnsignedDecisions,
)
from keel.workflows.policy import validate_arguments

DECISION_FORMAT = "keel.decide/1"  # names what is signed, so no other message can pass for it
SIGNATURE_SKEW = timedelta(minutes=5)  # clocks of approvers' machines and workers may differ


class DecisionTarget(NamedTuple):
    """The run a decision is for: what a signature binds it to besides the call."""

    namespace: str
    workflow_id: str
    first_run_id: str  # the first run of its continue-as-new chain


class Verdict(NamedTuple):
    """What `judge` says of a decision: why it is refused ('' when it applies), and when it
    applies, the request it answers and the decision as it will run (an edit's arguments
    merged onto the call's)."""

    refusal: str
    request: ApprovalRequest | None = None
    decision: DecideInput | None = None
    signed: bool = False  # its signature verified against the approver's key


def judge(
    spec: AgentSpec | None,
    state: AgentState,
    d: DecideInput,
    now: datetime,
    target: DecisionTarget,
) -> Verdict:
    """The one verdict on a decision arriving `now` for the run `target`."""
    policy = spec.policy if spec is not None else None
    refusal = rate_refusal(state, now, policy) or _state_refusal(state, d, now)
    if refusal:
        return Verdict(refusal)
    request = next(r for r in state.pending_approvals if r.call_id == d.call_id)
    refusal = _policy_refusal(spec, state, request, d, now, target)
    if refusal:
        return Verdict(refusal)
    if request.approvers and d.approver not in request.approvers:
        return Verdict(
            f"{d.approver!r} may not decide this call (allowed: {', '.join(request.approvers)})"
        )
    if d.decision == Decision.EDIT:
        if not d.arguments:
            return Verdict("an edit must carry the arguments to change")
        # an edit names only what changes: the call runs with the merged arguments
        merged = {**request.arguments, **d.arguments}
        tool = spec.tool(request.tool) if spec is not None else None
        problem = validate_arguments(tool, merged) if tool is not None else ""
        if problem:
            return Verdict(
                f"edited arguments are invalid: {problem} (the call would run with {merged})"
            )
        d = d.model_copy(update={"arguments": merged})
    user = policy.users.get(d.approver) if policy is not None else None
    # past the policy's check, a signature the policy can check has verified
    signed = bool(d.signature and user is not None and user.public_key)
    return Verdict("", request, d, signed)


def _state_refusal(state: AgentState, d: DecideInput, now: datetime) -> str:
    """Why the run's state refuses the decision: no approver, or no open request for it."""
    if not d.approver.strip():
        return "an approver must be named"
    request = next((r for r in state.pending_approvals if r.call_id == d.call_id), None)
    if request is None:
        prior = state.decision(d.call_id)
        if prior is None:
            if state.archive is not None and state.archive.decisions.dropped:
                # the state keeps the latest decisions; a call settled before them is
                # refused all the same (it is not pending), its decision is in the record
                return (
                    f"no pending approval with call id {d.call_id!r} (decisions on calls "
                    "settled earlier are in the run's archived record)"
                )
            return f"no pending approval with call id {d.call_id!r}"
        if prior.outcome == "expired":
            return f"the approval for {d.call_id} has expired"
        if prior.outcome == "withdrawn":
            return f"the approval for {d.call_id} was withdrawn (the turn was interrupted)"
        return f"call {d.call_id} was already decided ({prior.outcome} by {prior.by})"
    if now >= request.expires_at:
        return f"approval for {d.call_id} expired at {request.expires_at.isoformat()}"
    return ""


def _policy_refusal(
    spec: AgentSpec | None,
    state: AgentState,
    request: ApprovalRequest,
    d: DecideInput,
    now: datetime,
    target: DecisionTarget,
) -> str:
    """Why the run's policy refuses this decision: the signature (who decides), the
    approver's roles (may they), four-eyes (not on their own run)."""
    policy = spec.policy if spec is not None else None
    if policy is None:
        return ""
    label = policy_label(policy)
    user = policy.users.get(d.approver)
    key = user.public_key if user is not None else ""
    if d.signature and key:
        problem = signature_refusal(key, request, d, now, target)
        if problem:
            return problem
    elif not unsigned_allowed(policy):
        if d.signature:
            return f"{d.approver!r} has no public key in policy {label}, so nothing they sign holds"
        return (
            f"unsigned decision refused: policy {label} accepts only decisions signed with "
            "the approver's key (keel approve --key FILE)"
        )
    if policy.users and user is None:
        return f"{d.approver!r} is not a user of policy {label}"
    roles = approver_roles(policy, request.tool)
    if roles is not None:
        have = roles_of(policy, d.approver)
        if not set(have) & set(roles):
            return (
                f"{d.approver!r} (roles: {', '.join(have) or 'none'}) may not decide calls of "
                f"{request.tool}: policy {label} lets roles {', '.join(roles) or 'none'}"
            )
    tool = spec.tool(request.tool) if spec is not None else None
    if (
        d.decision != Decision.REJECT
        and d.approver == state.user
        and four_eyes(policy, request.tool)
        and (tool is None or tool.side_effects)
    ):
        return (
            f"four-eyes: {d.approver!r} started this run, so another approver must approve "
            f"its side-effecting call of {request.tool} (policy {label})"
        )
    return ""


# --- what the policy says of decisions ----------------------------------------------------------


def unsigned_allowed(policy: Policy) -> bool:
    """Whether the policy accepts decisions without a signature: as it says, or else only
    while no user has a public key (the embedded default's demo)."""
    if policy.unsigned_decisions is not None:
        return policy.unsigned_decisions == UnsignedDecisions.ALLOWED
    return not any(u.public_key for u in policy.users.values())


def approver_roles(policy: Policy, tool: str) -> list[str] | None:
    """The roles that may decide this tool's calls (None: any user the policy names)."""
    entry = policy.tools.get(tool)
    if entry is not None and entry.approvers is not None:
        return entry.approvers
    return policy.default_approvers


def four_eyes(policy: Policy, tool: str) -> bool:
    """Whether the run's own user is kept from approving this tool's side-effecting calls."""
    entry = policy.tools.get(tool)
    if entry is not None and entry.four_eyes is not None:
        return entry.four_eyes
    return policy.four_eyes


# --- signatures -----------------------------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no whitespace, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _timestamp(at: datetime) -> str:
    return at.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def decision_message(d: DecideInput, target: DecisionTarget) -> bytes:
    """What an approver signs: the decision bound to one call of one run in one namespace."""
    return canonical_json(
        {
            "format": DECISION_FORMAT,
            "namespace": target.namespace,
            "workflow_id": target.workflow_id,
            "first_run_id": target.first_run_id,
            "call_id": d.call_id,
            "decision": d.decision.value,
            "arguments": d.arguments,
            "approver": d.approver,
            "reason": d.reason,
            "signed_at": _timestamp(d.signed_at) if d.signed_at else None,
        }
    )


def signature_refusal(
    public_key: str,
    request: ApprovalRequest,
    d: DecideInput,
    now: datetime,
    target: DecisionTarget,
) -> str:
    """Why this signed decision does not hold ('' when its signature verifies, for this run
    and call, made after the approval was asked for and not in the future)."""
    at = d.signed_at
    if at is None or at.tzinfo is None:
        return "a signed decision must carry signed_at, with a time zone"
    if at > now + SIGNATURE_SKEW:
        return f"the decision is signed at {_timestamp(at)}, in the future"
    if at < request.requested_at - SIGNATURE_SKEW:
        return (
            f"the decision is signed at {_timestamp(at)}, before this approval was asked "
            f"for ({_timestamp(request.requested_at)}): it was made for something else"
        )
    try:
        key = Ed25519PublicKey.from_public_bytes(base64.b64decode(public_key, validate=True))
        key.verify(
            base64.b64decode(d.signature, validate=True),
            decision_message(d, target),
        )
    except (InvalidSignature, ValueError, TypeError):
        return (
            f"the signature does not verify against {d.approver}'s key: the decision was "
            "changed, signed with another key, or signed for another run or call"
        )
    return ""


# --- decisions per second: a token bucket in the run's state -----------------------------------


def _rate(policy: Policy | None) -> tuple[float, int]:
    if policy is None:
        return DECISIONS_PER_SECOND, DECISION_BURST
    return policy.decisions_per_second, policy.decision_burst


def decision_tokens(state: AgentState, now: datetime, policy: Policy | None) -> float:
    """Decisions the run would take at `now`."""
    rate, burst = _rate(policy)
    if state.decision_tokens_at is None:
        return float(burst)
    elapsed = max((now - state.decision_tokens_at).total_seconds(), 0.0)
    return min(float(burst), state.decision_tokens + elapsed * rate)


def rate_refusal(state: AgentState, now: datetime, policy: Policy | None) -> str:
    """Why a decision arriving now is one too many ('' when the run takes it)."""
    if decision_tokens(state, now, policy) >= 1:
        return ""
    rate, burst = _rate(policy)
    return (
        f"too many decisions: this run takes {burst} at once and {rate:g} a second after "
        "that; send it again in a moment"
    )


def spend_decision(state: AgentState, now: datetime, policy: Policy | None) -> None:
    """Count a decision that arrived now (accepted or refused) against the bucket."""
    tokens = decision_tokens(state, now, policy)
    if tokens >= 1:
        state.decision_tokens, state.decision_tokens_at = tokens - 1, now
