"""What a caller may list: the runs their policy lets them see, as a list query."""

from __future__ import annotations

from keel.policy_file import PolicyError
from keel.workflows.authz import tenant_of, users_of_tenant, visibility
from keel.workflows.models import Policy, Visibility


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
