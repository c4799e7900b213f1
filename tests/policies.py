"""Policies and approver keys the policy tests share."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from temporalio.client import Client

from keel.client.signing import load_signing_key, new_signing_key
from keel.policy_file import parse_policy
from keel.workflows.decisions import DecisionTarget, judge
from keel.workflows.models import AgentSpec, AgentState, DecideInput, Policy


@dataclass(frozen=True)
class KeyPair:
    pem: bytes
    public: str

    @property
    def private(self) -> Ed25519PrivateKey:
        return load_signing_key(self.pem)


def key_pair() -> KeyPair:
    pem, public = new_signing_key()
    return KeyPair(pem, public)


# dana starts runs and may approve (but not her own side effects: four-eyes); alice approves;
# mallory has a key but no approver role; gail is of another tenant; root sees everything
BASE: dict[str, Any] = {
    "id": "test-policy",
    "four_eyes": True,
    "users": {
        "dana": {"roles": ["customer", "approver"], "tenant": "acme"},
        "sam": {"roles": ["customer"], "tenant": "acme"},
        "gail": {"roles": ["customer"], "tenant": "globex"},
        "alice": {"roles": ["approver"], "tenant": "acme"},
        "mallory": {"roles": ["customer"], "tenant": "acme"},
        "root": {"roles": ["admin"]},
    },
    "roles": {
        "customer": {"agents": ["guarded", "guarded-open", "calc", "chat"]},
        "approver": {"agents": ["*"], "sees": "tenant"},
        "admin": {"agents": ["*"], "sees": "all"},
        "frugal": {"agents": ["chat"], "max_steps": 1},
    },
    "tools": {"charge": {"approvers": ["approver"]}},
    "agents": {"calc": {"tools": ["add", "slow_lookup"]}, "chat": {"tools": ["add"]}},
}


def policy_data(keys: dict[str, KeyPair] | None = None, **changes: Any) -> dict[str, Any]:
    """The base policy with these users' public keys and top-level keys changed."""
    data = copy.deepcopy(BASE)
    for user, pair in (keys or {}).items():
        data["users"].setdefault(user, {"roles": []})["public_key"] = pair.public
    data.update(changes)
    return data


def make_policy(keys: dict[str, KeyPair] | None = None, **changes: Any) -> Policy:
    return parse_policy(policy_data(keys, **changes))


async def target_of(client: Client, run: str) -> DecisionTarget:
    """What a decision for this run is signed for (as AgentClient.decide finds it)."""
    info = (await client.get_workflow_handle(run).describe()).raw_description
    return DecisionTarget(client.namespace, run, info.workflow_execution_info.first_run_id)


NO_RUN = DecisionTarget("", "", "")


def refuse_decision(
    spec: AgentSpec | None,
    state: AgentState,
    d: DecideInput,
    now: datetime,
    target: DecisionTarget = NO_RUN,
) -> str:
    """Why the run refuses this decision ('' when it applies): `judge`'s verdict."""
    return judge(spec, state, d, now, target).refusal
