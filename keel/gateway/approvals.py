"""/api/approvals: the caller's inbox of open approvals, and their decisions.

The approver is always the caller, never a field of the body. Where the gateway holds the
caller's signing key (`KEEL_API_SIGNING_KEYS/<user>.pem`) the decision is signed with it for
this run and call; the run judges it (state, roles, four-eyes, signature) in its update
validator, which refuses before anything reaches the history.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path
from pydantic import BaseModel, Field

from keel.client.api import PendingApproval
from keel.client.signing import sign_decision
from keel.gateway.auth import Caller
from keel.gateway.context import Gateway, RunRef, caller, gateway, visible_run
from keel.gateway.problems import documented
from keel.workflows.models import DecideInput, DecideReceipt, Decision

router = APIRouter(prefix="/api")


class Approvals(BaseModel):
    approvals: list[PendingApproval]


class Decide(BaseModel):
    decision: Decision
    reason: str = Field(default="", max_length=2000)
    arguments: dict[str, Any] | None = None  # for "edit": the arguments to change


@router.get("/approvals", response_model=Approvals, responses=documented())
async def list_approvals(
    who: Annotated[Caller, Depends(caller)], gw: Annotated[Gateway, Depends(gateway)]
) -> Approvals:
    """Every open approval in the runs the caller may see, oldest first, each with its
    tool's JSON schema (`parameters`) to build an edit form from."""
    return Approvals(approvals=await gw.agents(who).pending(schemas=True))


@router.post(
    "/runs/{run_id}/approvals/{call_id}",
    response_model=DecideReceipt,
    responses=documented(403, 404, 409),
)
async def decide(
    body: Decide,
    run: Annotated[RunRef, Depends(visible_run)],
    who: Annotated[Caller, Depends(caller)],
    gw: Annotated[Gateway, Depends(gateway)],
    call_id: Annotated[str, Path(max_length=200)],
) -> DecideReceipt:
    """Approve, reject or edit (approve with changed arguments) a pending call, as the
    caller; a refusal carries the run's own reason."""
    if not run.running:
        raise run.ended("nothing waits for a decision")
    d = DecideInput(
        call_id=call_id,
        decision=body.decision,
        approver=who.user,
        reason=body.reason,
        arguments=body.arguments if body.decision == Decision.EDIT else None,
    )
    key = gw.signing_key(who.user)
    if key is not None:
        d = sign_decision(key, d, gw.target(run), datetime.now(UTC))
    return await gw.agents(who).decide(run.run_id, d)
