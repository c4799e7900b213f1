"""Approvers' keys: made and loaded on the approver's side, and decisions signed with them.

The run verifies a signature against the approver's public key in its own policy
(`keel.workflows.decisions`); the private key never leaves the approver's machine.
"""

from __future__ import annotations

import base64
from datetime import datetime

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from keel.workflows.decisions import DecisionTarget, decision_message
from keel.workflows.models import DecideInput


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
