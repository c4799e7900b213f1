"""Who calls: a bearer token (or the sign-in cookie holding one), found by its sha256 in the
tokens file (`KEEL_API_TOKENS`), which names the policy user it acts as.

The file holds no token, only hashes, so reading it gives no way in. It is read again when it
changes: removing a hash revokes that token at the next request, with no restart.

    [tokens.ann-laptop]
    user = "ann"
    sha256 = "<hex of sha256 of the token>"
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import tomllib
from dataclasses import dataclass, field
from typing import Any

from keel.config import SettingsError
from keel.workflows.authz import roles_of, tenant_of, visibility
from keel.workflows.models import Policy, Visibility

SESSION_COOKIE = "keel_session"
TOKEN_PREFIX = "keel_"
HEX64 = re.compile(r"^[0-9a-f]{64}$")


def new_token() -> str:
    """A fresh token: 256 random bits, URL-safe."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_hash(token: str) -> str:
    """What the tokens file keeps of a token."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_entry(user: str, name: str, token: str) -> str:
    """The tokens file's lines (TOML) for this token of this user."""
    return f"[tokens.{json.dumps(name)}]\nuser = {json.dumps(user)}\nsha256 = {json.dumps(token_hash(token))}\n"


@dataclass(frozen=True)
class Caller:
    """The authenticated user, as the policy sees them (roles, tenant, whose runs)."""

    user: str
    token: str  # the tokens file's name of the token used (never the token)
    roles: list[str] = field(default_factory=list)
    tenant: str = ""
    sees: Visibility = Visibility.OWN
    by_cookie: bool = False

    @classmethod
    def of(cls, user: str, token: str, policy: Policy | None, by_cookie: bool = False) -> Caller:
        if policy is None:
            return cls(user, token, by_cookie=by_cookie)
        return cls(
            user,
            token,
            roles_of(policy, user),
            tenant_of(policy, user),
            visibility(policy, user),
            by_cookie,
        )


class TokenFile:
    """The tokens file: token hash → (its name, its user); read again when it changes."""

    def __init__(self, path: str) -> None:
        self.path = os.path.expanduser(path)
        self._seen: tuple[float, int] | None = None
        self._users: dict[str, tuple[str, str]] = {}
        self.reload()

    def reload(self) -> None:
        """Read the file if it changed since it was last read; SettingsError if it is wrong."""
        try:
            st = os.stat(self.path)
        except OSError as e:
            raise SettingsError(f"KEEL_API_TOKENS={self.path}: {e.strerror}") from None
        stamp = (st.st_mtime, st.st_size)
        if stamp == self._seen:
            return
        self._users = parse_tokens(self.path)
        self._seen = stamp

    def lookup(self, token: str) -> tuple[str, str] | None:
        """(the token's name, its user), or None for a token the file does not hold."""
        self.reload()
        return self._users.get(token_hash(token))


def parse_tokens(path: str) -> dict[str, tuple[str, str]]:
    """The tokens of a file (TOML, or JSON for a `.json` name) by their hash."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        data: Any = json.loads(raw) if path.endswith(".json") else tomllib.loads(raw.decode())
    except (OSError, ValueError) as e:
        raise SettingsError(f"KEEL_API_TOKENS={path}: cannot be read: {e}") from None
    tokens = data.get("tokens") if isinstance(data, dict) else None
    if not isinstance(tokens, dict):
        raise SettingsError(f"KEEL_API_TOKENS={path}: no [tokens.NAME] entries")
    out: dict[str, tuple[str, str]] = {}
    for name, entry in tokens.items():
        user = entry.get("user") if isinstance(entry, dict) else None
        digest = str(entry.get("sha256", "")).lower() if isinstance(entry, dict) else ""
        if not isinstance(user, str) or not user.strip() or not HEX64.match(digest):
            raise SettingsError(
                f'KEEL_API_TOKENS={path}: tokens.{name} needs user = "NAME" and sha256 = '
                '"<64 hex digits>" (keel token new --user NAME prints both)'
            )
        if digest in out:
            raise SettingsError(f"KEEL_API_TOKENS={path}: tokens.{name} repeats a hash")
        out[digest] = (str(name), user)
    return out
