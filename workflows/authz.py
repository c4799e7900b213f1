"""Who may do what: a run's policy, applied. Pure functions, no I/O and no clock.

The workflow calls them with its spec snapshot (which holds the policy the run started with)
and `workflow.now()`, so the same input gives the same answer on replay. The worker uses
`parse_policy` to check a policy file; clients use `sign_decision` to sign what they send.

A decision is signed with the approver's ed25519 key over `decision_message`: canonical JSON
(sorted keys, no whitespace, ASCII) of the run it is for (namespace, workflow id and the id of
the first run of its chain, which continue-as-new keeps and a new run under the same workflow
id does not), the call id, the decision, the edit's arguments, the approver, the reason and
the time of signing. The run verifies it against the approver's public key in its own policy,
so a signature made for another call or another run, or over other arguments, does not
verify there.
"""

from __future__ import annotations

import base64
import hashlib
import json
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, NamedTuple

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from pydantic import ValidationError

from keel.workflows.models import (
    DECISION_BURST,
    DECISIONS_PER_SECOND,
    AgentSpec,
    AgentState,
    ApprovalRequest,
    DecideInput,
    Decision,
    Limits,
    Policy,
    ToolSpec,
    UnsignedDecisions,
    Visibility,
)

DECISION_FORMAT = "keel.decide/1"  # names what is signed, so no other message can pass for it
SIGNATURE_SKEW = timedelta(minutes=5)  # clocks of approvers' machines and workers may differ
START_REFUSED = "StartRefused"  # the ApplicationError type of a run its user may not start
_VISIBILITY_ORDER = [Visibility.OWN, Visibility.TENANT, Visibility.ALL]


class PolicyError(ValueError):
    """A policy that cannot be used; the message says where and why."""


class DecisionTarget(NamedTuple):
    """The run a decision is for: what a signature binds it to besides the call."""

    namespace: str
    workflow_id: str
    first_run_id: str  # the first run of its continue-as-new chain


# --- loading and naming a policy --------------------------------------------------------------


def canonical_json(value: Any) -> bytes:
    """One byte string per JSON value: sorted keys, no whitespace, ASCII."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def policy_digest(policy: Policy) -> str:
    """sha256 of the policy's canonical JSON (its `digest` left out)."""
    data = policy.model_dump(mode="json", exclude={"digest"})
    return hashlib.sha256(canonical_json(data)).hexdigest()


def policy_label(policy: Policy) -> str:
    """How refusals name a policy: its id, and the start of its digest."""
    short = policy.digest[:12]
    return f"{policy.id} ({short})" if policy.id else short or "(unnamed)"


def parse_policy(data: Mapping[str, Any]) -> Policy:
    """A policy from a file's contents, checked and with its digest: unknown keys, roles
    named but not defined, public keys that are not ed25519 are refused with PolicyError."""
    try:
        policy = Policy.model_validate(dict(data), context={"policy_file": True})
    except ValidationError as e:
        raise PolicyError(f"invalid policy: {e}") from None
    if policy.digest:
        raise PolicyError("invalid policy: `digest` is computed when it is loaded; remove it")
    for name, user in policy.users.items():
        if user.public_key:
            try:
                user.public_key = public_key_text(user.public_key)
            except ValueError as e:
                raise PolicyError(f"invalid policy: users.{name}.public_key: {e}") from None
    used = [(f"users.{n}.roles", r) for n, u in policy.users.items() for r in u.roles]
    used += [("default_roles", r) for r in policy.default_roles]
    used += [("default_approvers", r) for r in policy.default_approvers or []]
    used += [
        (f"tools.{n}.approvers", r) for n, t in policy.tools.items() for r in t.approvers or []
    ]
    for where, role in used:
        if role not in policy.roles:
            raise PolicyError(
                f"invalid policy: {where} names role {role!r}, which is not defined "
                f"(add [roles.{role}]; defined: {', '.join(sorted(policy.roles)) or 'none'})"
            )
    if policy.unsigned_decisions == UnsignedDecisions.REFUSED and not _has_keys(policy):
        raise PolicyError(
            "invalid policy: unsigned_decisions is refused but no user has a public_key, so "
            "no decision could ever be accepted"
        )
    policy.digest = policy_digest(policy)
    return policy


def public_key_text(text: str) -> str:
    """An ed25519 public key (base64 of its 32 bytes, `ed25519:` + that, or a PEM) as base64
    of its 32 bytes; ValueError when it is none of those."""
    text = text.strip()
    if text.startswith("-----BEGIN"):
        key = serialization.load_pem_public_key(text.encode())
        if not isinstance(key, Ed25519PublicKey):
            raise ValueError("the PEM holds a key that is not ed25519")
        raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    else:
        text = text.removeprefix("ed25519:")
        try:
            raw = base64.b64decode(text, validate=True)
        except ValueError:
            raise ValueError("not base64 (nor a PEM)") from None
        if len(raw) != 32:
            raise ValueError(f"an ed25519 public key has 32 bytes, this one {len(raw)}")
    return base64.b64encode(raw).decode()


def new_signing_key() -> tuple[bytes, str]:
    """A fresh approver key: its private half as a PEM (PKCS#8) and its public half as the
    base64 line a policy names it by."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    return pem, public_key_of(key)


def public_key_of(key: Ed25519PrivateKey) -> str:
    """The base64 public key of a private key, as a policy names it."""
    raw = key.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return base64.b64encode(raw).decode()


def load_signing_key(data: bytes | str) -> Ed25519PrivateKey:
    """A private key from a key file's contents: a PEM (as `keel keygen --signing` writes) or
    base64 of the 32-byte seed. ValueError when it is neither."""
    raw = data.encode() if isinstance(data, str) else data
    raw = raw.strip()
    if raw.startswith(b"-----BEGIN"):
        key = serialization.load_pem_private_key(raw, password=None)
        if not isinstance(key, Ed25519PrivateKey):
            raise ValueError("the key file holds a key that is not ed25519")
        return key
    try:
        seed = base64.b64decode(raw, validate=True)
    except ValueError:
        raise ValueError("the key file is neither a PEM nor base64") from None
    if len(seed) != 32:
        raise ValueError(f"an ed25519 private key has 32 bytes, this one {len(seed)}")
    return Ed25519PrivateKey.from_private_bytes(seed)


# --- who a user is ------------------------------------------------------------------------------


def roles_of(policy: Policy, user: str) -> list[str]:
    """The user's roles (the policy's `default_roles` for a user it does not name)."""
    entry = policy.users.get(user)
    return list(entry.roles) if entry is not None else list(policy.default_roles)


def tenant_of(policy: Policy | None, user: str) -> str:
    """The user's tenant ('' when none)."""
    entry = policy.users.get(user) if policy is not None else None
    return entry.tenant if entry is not None else ""


def users_of_tenant(policy: Policy, tenant: str) -> list[str]:
    """The users the policy puts in this tenant."""
    return sorted(n for n, u in policy.users.items() if tenant and u.tenant == tenant)


def visibility(policy: Policy, user: str) -> Visibility:
    """Whose runs the user may list: the widest of its roles' `sees`."""
    seen = [policy.roles[r].sees for r in roles_of(policy, user) if r in policy.roles]
    return max(seen, key=_VISIBILITY_ORDER.index, default=Visibility.OWN)


# --- starting a run, using a tool, budgets ------------------------------------------------------


def start_refusal(policy: Policy | None, agent: str, user: str) -> str:
    """Why this user may not start this agent ('' when they may). A policy without roles
    does not restrict starts."""
    if policy is None or not policy.roles:
        return ""
    roles = roles_of(policy, user)
    for r in roles:
        allowed = policy.roles[r].agents if r in policy.roles else []
        if agent in allowed or "*" in allowed:
            return ""
    who = f"user {user!r}" if user else "a run without a user"
    may = sorted(r for r, d in policy.roles.items() if agent in d.agents or "*" in d.agents)
    return (
        f"{who} may not start agent {agent!r}: policy {policy_label(policy)} gives "
        f"{'roles ' + ', '.join(roles) if roles else 'no role'}; the roles that may: "
        f"{', '.join(may) or 'none'}"
    )


def allowed_tools(policy: Policy | None, agent: str, tools: Sequence[ToolSpec]) -> list[ToolSpec]:
    """The agent's tools its policy allows (all of them when it names none for the agent)."""
    entry = policy.agents.get(agent) if policy is not None else None
    if entry is None or entry.tools is None:
        return list(tools)
    return [t for t in tools if t.name in entry.tools]


def tool_refusal(spec: AgentSpec, tool: str) -> str:
    """Why the run's policy does not let this agent call this tool ('' when it does)."""
    policy = spec.policy
    entry = policy.agents.get(spec.name) if policy is not None else None
    if policy is None or entry is None or entry.tools is None or tool in entry.tools:
        return ""
    return (
        f"the tool {tool!r} is not allowed for agent {spec.name!r} by policy "
        f"{policy_label(policy)} (allowed: {', '.join(entry.tools) or 'none'}); "
        "it was not run"
    )


def effective_limits(spec: AgentSpec, user: str) -> Limits:
    """The agent's limits, lowered by the user's roles' (the most generous role counts; a
    role without a limit leaves the agent's)."""
    policy = spec.policy
    if policy is None:
        return spec.limits
    roles = [policy.roles[r] for r in roles_of(policy, user) if r in policy.roles]
    limits = spec.limits
    steps = [r.max_steps for r in roles if r.max_steps is not None]
    if roles and len(steps) == len(roles):
        limits = limits.model_copy(update={"max_steps": min(limits.max_steps, max(steps))})
    tokens = [r.max_tokens for r in roles if r.max_tokens is not None]
    if roles and len(tokens) == len(roles):
        limits = limits.model_copy(update={"max_tokens": min(limits.max_tokens, max(tokens))})
    return limits


# --- decisions ------------------------------------------------------------------------------------


def _has_keys(policy: Policy) -> bool:
    return any(u.public_key for u in policy.users.values())


def unsigned_allowed(policy: Policy) -> bool:
    """Whether the policy accepts decisions without a signature: as it says, or else only
    while no user has a public key (the embedded default's demo)."""
    if policy.unsigned_decisions is not None:
        return policy.unsigned_decisions == UnsignedDecisions.ALLOWED
    return not _has_keys(policy)


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


def sign_decision(
    key: Ed25519PrivateKey, d: DecideInput, target: DecisionTarget, at: datetime
) -> DecideInput:
    """The decision with `signed_at` and its signature. It goes through JSON first, so what
    is signed is exactly what the run will decode."""
    d = DecideInput.model_validate_json(
        d.model_copy(update={"signed_at": at, "signature": ""}).model_dump_json()
    )
    signature = key.sign(decision_message(d, target))
    return d.model_copy(update={"signature": base64.b64encode(signature).decode()})


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


def approver_refusal(
    spec: AgentSpec | None,
    state: AgentState,
    request: ApprovalRequest,
    d: DecideInput,
    now: datetime,
    target: DecisionTarget,
) -> str:
    """Why the run's policy refuses this decision ('' when it holds): the signature (who
    decides), the approver's roles (may they), four-eyes (not on their own run)."""
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


# --- what a caller may list ------------------------------------------------------------------


def _quoted(value: str) -> str:
    if "'" in value or "\\" in value:
        raise PolicyError(f"a user or tenant name cannot hold quotes or backslashes: {value!r}")
    return f"'{value}'"


def visibility_query(policy: Policy | None, user: str) -> str:
    """The list filter (` AND ...`) of the runs this user may see: their own; their
    tenant's, or every run, as their roles' `sees` says. Without a policy: their own."""
    seen = visibility(policy, user) if policy is not None else Visibility.OWN
    if seen == Visibility.ALL:
        return ""
    tenant = tenant_of(policy, user)
    if seen == Visibility.TENANT and tenant and policy is not None:
        users = ", ".join(_quoted(u) for u in sorted({user, *users_of_tenant(policy, tenant)}))
        return f" AND (AgentTenant = {_quoted(tenant)} OR AgentUser IN ({users}))"
    return f" AND AgentUser = {_quoted(user)}"
