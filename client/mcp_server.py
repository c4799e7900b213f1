"""`keel mcp`: Keel's runs as an MCP server, for the MCP clients people already use.

Every tool acts as one policy user through the functions `keel serve` answers with (and so
through AgentClient), and decides nothing itself: who may start which agent, whose runs a
user sees (any other run is "not found", as a run that does not exist), and whether a
decision stands (roles, tenancy, four-eyes, signatures) are the same rules, applied by the
same code and by the run itself.

Over stdio the user is the person who started the server (`--user`, KEEL_USER) and decisions
are signed with their key (KEEL_APPROVER_KEY), as `keel approve` signs them. Over streamable
HTTP each request carries a bearer token from the tokens file `keel serve` reads
(KEEL_API_TOKENS); its user is the caller, and decisions are signed with that user's key in
KEEL_API_SIGNING_KEYS, as the HTTP API signs them.
"""

from __future__ import annotations

import logging
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from mcp.server.auth.provider import AccessToken
from mcp.server.auth.settings import AuthSettings
from mcp.server.fastmcp import FastMCP
from mcp.server.fastmcp.exceptions import ToolError
from mcp.types import ToolAnnotations
from pydantic import ValidationError

from keel.activities.registry import Agent
from keel.client.api import load_approver_key
from keel.client.mcp_tools import KeelTools
from keel.config import Settings, SettingsError
from keel.gateway.auth import TokenFile, token_hash
from keel.gateway.context import Gateway
from keel.workflows.models import Policy

log = logging.getLogger("keel.mcp")
READ = ToolAnnotations(readOnlyHint=True, openWorldHint=False)
ACT = ToolAnnotations(readOnlyHint=False, destructiveHint=False, openWorldHint=False)
ENDS = ToolAnnotations(readOnlyHint=False, destructiveHint=True, openWorldHint=False)
INSTRUCTIONS = (
    "Keel runs AI agents durably. Start a run (start_run), wait until it answers or needs an "
    "approval (wait_for_run), read the pending calls with their arguments and JSON schema "
    "(pending_approvals), then approve_call, reject_call (the model sees the reason) or "
    "edit_call; read the answer with run_result. You act as one user of Keel's policy: you "
    "see only the runs it lets that user see."
)


class KeelServer(FastMCP):
    """FastMCP whose tool errors read as Keel's refusals: the reason alone, and for bad
    arguments each field and what is wrong with it (not the SDK's wrapping of them)."""

    async def call_tool(self, name: str, arguments: dict[str, Any]) -> Any:
        try:
            return await super().call_tool(name, arguments)
        except ToolError as e:
            cause = e.__cause__
            if isinstance(cause, ValidationError):
                fields = "; ".join(
                    f"{'.'.join(str(x) for x in err['loc'])}: {err['msg']}"
                    for err in cause.errors()[:5]
                )
                raise ToolError(f"invalid arguments for {name}: {fields}") from cause
            if type(cause) is ToolError:  # a refusal of ours: its words as they are
                raise ToolError(str(cause)) from cause
            raise


class LocalGateway(Gateway):
    """The gateway as one person's: their own signing key, as `keel approve` uses it."""

    def __init__(self, settings: Settings, policy: Policy | None, client: Any, user: str) -> None:
        super().__init__(settings, policy, None, client)
        self.user = user
        self.key_file = settings.approver_key

    def signing_key(self, user: str) -> Ed25519PrivateKey | None:
        if user != self.user or not self.key_file:
            return None
        return load_approver_key(self.key_file, f"KEEL_APPROVER_KEY={self.key_file}")


class TokenFileVerifier:
    """The MCP SDK's token verifier over Keel's tokens file: the token's user is its
    subject, the file's name of the token its client (the file is read again when it
    changes, so a revoked token is refused at its next request)."""

    def __init__(self, tokens: TokenFile) -> None:
        self.tokens = tokens

    async def verify_token(self, token: str) -> AccessToken | None:
        try:
            found = self.tokens.lookup(token)
        except SettingsError as e:
            log.error("%s", e)
            return None
        if found is None:
            return None
        name, user = found
        return AccessToken(token=token_hash(token), client_id=name, scopes=[], subject=user)


def build_server(
    tools: KeelTools, auth: AuthSettings | None = None, host: str = "127.0.0.1"
) -> FastMCP:
    """The MCP server of these tools (with `auth`: bearer tokens from the gateway's file;
    `host`: where HTTP listens, which sets the DNS-rebinding protection for a local one)."""
    verifier = TokenFileVerifier(tools.gw.tokens) if auth and tools.gw.tokens else None
    server = KeelServer(
        "keel",
        instructions=INSTRUCTIONS,
        auth=auth,
        token_verifier=verifier,
        log_level="WARNING",
        host=host,
    )
    for fn, hints in (
        (tools.list_agents, READ),
        (tools.start_run, ACT),
        (tools.list_runs, READ),
        (tools.run_status, READ),
        (tools.run_transcript, READ),
        (tools.run_result, READ),
        (tools.wait_for_run, READ),
        (tools.send_message, ACT),
        (tools.pending_approvals, READ),
        (tools.approve_call, ACT),
        (tools.reject_call, ENDS),
        (tools.edit_call, ACT),
        (tools.cancel_run, ENDS),
    ):
        server.add_tool(fn, annotations=hints)
    return server


def local_server(
    settings: Settings, policy: Policy | None, client: Any, user: str, agents: list[Agent] | None
) -> FastMCP:
    """The server one person runs over stdio, acting as `user`."""
    gw = LocalGateway(settings, policy, client, user)
    return build_server(KeelTools(gw, agents, user))


def http_server(
    settings: Settings,
    policy: Policy | None,
    client: Any,
    host: str,
    port: int,
    agents: list[Agent] | None,
) -> FastMCP:
    """The server many people reach over streamable HTTP, each with a token of the file."""
    if not settings.api_tokens:
        raise SettingsError(
            "keel mcp --http needs KEEL_API_TOKENS: a file of token hashes "
            "(`keel token new --user NAME` prints a token and its entry)"
        )
    gw = Gateway(settings, policy, TokenFile(settings.api_tokens), client)
    # no OAuth server: tokens come from the file, so no metadata is published (the issuer
    # is only a required field); a request without a valid token is answered 401
    url = f"http://{host}:{port}"
    auth = AuthSettings(issuer_url=url, resource_server_url=None)  # type: ignore[arg-type]
    return build_server(KeelTools(gw, agents, None), auth, host)
