"""What every route stands on: the gateway's state, the caller, and the run they ask for.

A run is looked up once per request (one `describe`, which needs no worker) and shown only
to a caller who may see it, by the same rule as the lists (`keel.client.visibility`); any
other caller gets the 404 a missing run gets.
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

from fastapi import Depends, Request
from fastapi.security import APIKeyCookie, HTTPAuthorizationCredentials, HTTPBearer
from temporalio.client import Client, WorkflowExecutionStatus
from temporalio.service import RPCError, RPCStatusCode

from keel.client.api import AgentClient, KeelClientError, RunSummary, load_approver_key, no_worker
from keel.client.presence import worker_polls
from keel.client.visibility import may_see, run_status
from keel.config import Settings
from keel.gateway.auth import SESSION_COOKIE, Caller, TokenFile
from keel.gateway.feeds import RunFeeds
from keel.gateway.limits import RateLimiter, retry_after
from keel.gateway.problems import Problem, not_found
from keel.workflows.decisions import DecisionTarget
from keel.workflows.models import (
    AGENT_NAME,
    AGENT_STATUS,
    AGENT_STEPS,
    AGENT_TENANT,
    AGENT_USER,
    TOTAL_TOKENS,
    Policy,
)

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

SAFE_METHODS = {"GET", "HEAD", "OPTIONS"}
KEY_NAME = re.compile(r"^[A-Za-z0-9_@+-][A-Za-z0-9._@+-]{0,199}$")  # a user as a file name


@dataclass(frozen=True)
class RunRef:
    """A run the caller may see, as Temporal describes it (no worker needed)."""

    run_id: str
    agent: str
    user: str
    tenant: str
    status: str  # as keel status says it (Temporal's, once the run is closed)
    steps: int
    tokens: int
    temporal_status: str
    task_queue: str
    first_run_id: str
    started: datetime | None

    @property
    def running(self) -> bool:
        return self.temporal_status == "running"

    def summary(self) -> RunSummary:
        return RunSummary(
            run_id=self.run_id,
            agent=self.agent,
            status=self.status,
            user=self.user,
            steps=self.steps,
            tokens=self.tokens,
            started=self.started,
            temporal_status=self.temporal_status,
            task_queue=self.task_queue,
        )

    def ended(self, what: str) -> Problem:
        """The refusal of an act on a run that has ended."""
        return Problem(
            409, f"run {self.run_id} has ended ({self.status or self.temporal_status}): {what}"
        )


SERVED_SECONDS = 5.0  # how long a queue seen polled is trusted to be served


class Gateway:
    """The gateway's state: the Temporal client, the policy, the tokens, the rate limit and
    the directory of signing keys."""

    def __init__(
        self,
        settings: Settings,
        policy: Policy | None,
        tokens: TokenFile | None,  # None: one local user, no tokens (`keel mcp`)
        client: Client | None = None,
    ) -> None:
        # the gateway acts for many people: never as KEEL_USER, never with one approver's key
        self.settings = dataclasses.replace(
            settings, user=None, approver_key=None, policy_file=None
        )
        self.policy = policy
        self.tokens = tokens
        self.client = client
        self.limiter = RateLimiter(settings.api_rate)
        self.feeds = RunFeeds()  # one watcher per run followed, whoever follows it
        self._polled: dict[str, float] = {}  # task queue → when a worker was seen polling it
        self.signing_dir = settings.api_signing_keys
        self.origins = set(settings.api_cors_origins)

    def agents(self, caller: Caller) -> AgentClient:
        """AgentClient acting as the caller: their roles, tenant and visibility apply."""
        if self.client is None:
            raise Problem(503, "the gateway is not connected to Temporal yet")
        return AgentClient(self.client, self.settings, as_user=caller.user, policy=self.policy)

    def limit(self, key: str) -> None:
        """Count a request of `key` against the rate limit; 429 past it."""
        wait = self.limiter.wait_for(key)
        if wait:
            raise Problem(
                429,
                f"too many requests: {self.limiter.rate:g} a second are allowed "
                f"(a burst of {self.limiter.burst:g}); try again in {retry_after(wait)} s",
                headers={"Retry-After": retry_after(wait)},
            )

    async def run(self, caller: Caller, run_id: str) -> RunRef:
        """The run, if the caller may see it; else the 404 of a run that does not exist."""
        agents = self.agents(caller)
        try:
            desc = await agents.client.get_workflow_handle(run_id).describe()
        except RPCError as e:
            if e.status in (RPCStatusCode.NOT_FOUND, RPCStatusCode.INVALID_ARGUMENT):
                raise not_found(run_id) from None
            raise
        sa = desc.typed_search_attributes
        agent, user = sa.get(AGENT_NAME), sa.get(AGENT_USER) or ""
        tenant = sa.get(AGENT_TENANT) or ""
        if agent is None or not may_see(self.policy, caller.user, user, tenant):
            raise not_found(run_id)  # not a Keel run, or not the caller's to see
        status = desc.status or WorkflowExecutionStatus.RUNNING
        return RunRef(
            run_id=run_id,
            agent=agent,
            user=user,
            tenant=tenant,
            status=run_status(sa.get(AGENT_STATUS) or "", desc.status),
            steps=sa.get(AGENT_STEPS) or 0,
            tokens=sa.get(TOTAL_TOKENS) or 0,
            temporal_status=status.name.lower(),
            task_queue=desc.task_queue,
            first_run_id=desc.raw_description.workflow_execution_info.first_run_id,
            started=desc.start_time,
        )

    async def served(self, ref: RunRef) -> None:
        """Refuse at once (503 no-worker) to read a run no worker serves: the query would
        wait for an answer that cannot come. A queue seen polled is trusted for a few
        seconds (one RPC less on every read); one seen unserved is asked again each time."""
        assert self.client is not None
        now = time.monotonic()
        if now - self._polled.get(ref.task_queue, -SERVED_SECONDS) < SERVED_SECONDS:
            return
        polls = await worker_polls(self.client, ref.task_queue)
        if polls is False:
            raise no_worker(ref.run_id, ref.task_queue)
        if len(self._polled) > 1000:
            self._polled.clear()
        self._polled[ref.task_queue] = now

    def target(self, ref: RunRef) -> DecisionTarget:
        """What a decision on this run is signed for."""
        assert self.client is not None
        return DecisionTarget(self.client.namespace, ref.run_id, ref.first_run_id)

    def signing_key(self, user: str) -> Ed25519PrivateKey | None:
        """The user's key in KEEL_API_SIGNING_KEYS (`<user>.pem`), read when a decision is
        signed (a key added or removed counts at once); None when there is none."""
        if not self.signing_dir or not KEY_NAME.match(user):
            return None
        path = os.path.join(self.signing_dir, f"{user}.pem")
        if not os.path.isfile(path):
            return None
        try:
            return load_approver_key(path, f"KEEL_API_SIGNING_KEYS: {user}.pem")
        except KeelClientError as e:
            raise Problem(503, str(e)) from None

    def same_origin(self, request: Request) -> bool:
        """A browser request from the page's own origin or a configured one (or no browser)."""
        origin = request.headers.get("origin")
        if origin is None:
            return True
        own = f"{request.url.scheme}://{request.url.netloc}"
        return origin.rstrip("/") in self.origins | {own}


def gateway(request: Request) -> Gateway:
    gw: Gateway = request.app.state.gateway
    return gw


_bearer = HTTPBearer(auto_error=False, description="a token from `keel token new`")
_cookie = APIKeyCookie(
    name=SESSION_COOKIE, auto_error=False, description="set by POST /api/session"
)


def client_address(request: Request) -> str:
    return request.client.host if request.client else "unknown"


async def caller(
    request: Request,
    gw: Annotated[Gateway, Depends(gateway)],
    bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
    cookie: Annotated[str | None, Depends(_cookie)],
) -> Caller:
    """The authenticated caller (401 otherwise), within the rate limit (429 otherwise)."""
    token = bearer.credentials if bearer is not None else cookie
    found = gw.tokens.lookup(token) if token and gw.tokens else None
    if found is None:
        gw.limit(f"address:{client_address(request)}")  # guessing tokens is limited too
        why = "this token is not known (revoked, or mistyped)" if token else "sign in first"
        raise Problem(
            401,
            f"{why}: send `Authorization: Bearer <token>`, or POST /api/session with it",
            headers={"WWW-Authenticate": "Bearer"},
        )
    name, user = found
    gw.limit(f"user:{user}")
    by_cookie = bearer is None
    if by_cookie and request.method not in SAFE_METHODS and not gw.same_origin(request):
        # a cookie goes along with requests other sites' pages make: only the page's own
        # origin (or a configured one) may act with it
        raise Problem(
            403, f"origin {request.headers.get('origin')} may not act with the sign-in cookie"
        )
    return Caller.of(user, name, gw.policy, by_cookie)


async def visible_run(
    run_id: str,
    who: Annotated[Caller, Depends(caller)],
    gw: Annotated[Gateway, Depends(gateway)],
) -> RunRef:
    """The run of the path, if the caller may see it (else 404)."""
    return await gw.run(who, run_id)
