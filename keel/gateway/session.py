"""/api/me and /api/session: who the caller is, and signing a browser in and out.

Signing in puts the token in an HttpOnly, SameSite=Strict cookie (`keel_session`): the page's
scripts never hold it, and other sites' pages cannot send it. The cookie is the token itself:
it is checked like a bearer token, so removing the token's hash signs that browser out too.
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request, Response
from pydantic import BaseModel, Field

from keel.gateway.auth import SESSION_COOKIE, Caller
from keel.gateway.context import Gateway, caller, client_address, gateway
from keel.gateway.problems import Problem, documented
from keel.workflows.models import Visibility

router = APIRouter(prefix="/api")


class Me(BaseModel):
    user: str
    roles: list[str]
    tenant: str
    sees: Visibility


class SignIn(BaseModel):
    token: str = Field(min_length=1, max_length=500)


@router.get("/me", response_model=Me, responses=documented())
async def me(who: Annotated[Caller, Depends(caller)]) -> Me:
    """The caller as the policy sees them: roles, tenant, whose runs they see."""
    return Me(user=who.user, roles=who.roles, tenant=who.tenant, sees=who.sees)


@router.post("/session", status_code=204, responses=documented(403))
async def sign_in(
    body: SignIn, request: Request, gw: Annotated[Gateway, Depends(gateway)]
) -> Response:
    """Sign this browser in with a token: the answer sets the `keel_session` cookie."""
    gw.limit(f"address:{client_address(request)}")  # guessing tokens is limited
    if not gw.same_origin(request):
        raise Problem(403, f"origin {request.headers.get('origin')} may not sign in here")
    if gw.tokens.lookup(body.token) is None:
        raise Problem(
            401,
            "this token is not known (revoked, or mistyped)",
            headers={"WWW-Authenticate": "Bearer"},
        )
    response = Response(status_code=204)
    response.set_cookie(
        SESSION_COOKIE,
        body.token,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https",
        path="/",
    )
    return response


@router.delete("/session", status_code=204, responses=documented())
async def sign_out(request: Request, gw: Annotated[Gateway, Depends(gateway)]) -> Response:
    """Sign this browser out: the cookie is removed."""
    gw.limit(f"address:{client_address(request)}")
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/", httponly=True, samesite="strict")
    return response
