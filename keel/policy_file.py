"""Policy files: parsed and checked when a worker or client loads one, never in a workflow.

A policy is TOML or JSON (`keel.activities.registry.load_policy` reads the file); its digest
is the sha256 of its canonical JSON, so a run's record names exactly the policy it ran under.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Mapping
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from pydantic import ValidationError

from keel.workflows.decisions import canonical_json
from keel.workflows.models import Policy, UnsignedDecisions


class PolicyError(ValueError):
    """A policy that cannot be used; the message says where and why."""


def policy_digest(policy: Policy) -> str:
    """sha256 of the policy's canonical JSON (its `digest` left out)."""
    data = policy.model_dump(mode="json", exclude={"digest"})
    return hashlib.sha256(canonical_json(data)).hexdigest()


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
    if policy.unsigned_decisions == UnsignedDecisions.REFUSED and not any(
        u.public_key for u in policy.users.values()
    ):
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
