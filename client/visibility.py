"""What a caller may see: the runs their policy lets them see, as a list query, and the same
rule for one run."""

from __future__ import annotations

from keel.policy_file import PolicyError
from keel.workflows.authz import tenant_of, users_of_tenant, visibility
from keel.workflows.models import Policy, Visibility


def quoted(value: str) -> str:
    """A value as a list query's string literal; PolicyError for one it cannot hold."""
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
        users = ", ".join(quoted(u) for u in sorted({user, *users_of_tenant(policy, tenant)}))
        return f" AND (AgentTenant = {quoted(tenant)} OR AgentUser IN ({users}))"
    return f" AND AgentUser = {quoted(user)}"


def may_see(policy: Policy | None, user: str, run_user: str, run_tenant: str) -> bool:
    """Whether this user may see a run of `run_user` in `run_tenant` (its AgentUser and
    AgentTenant): the rule `visibility_query` lists by, for one run."""
    seen = visibility(policy, user) if policy is not None else Visibility.OWN
    if seen == Visibility.ALL or run_user == user:
        return True
    tenant = tenant_of(policy, user)
    if seen == Visibility.TENANT and tenant and policy is not None:
        return run_tenant == tenant or run_user in users_of_tenant(policy, tenant)
    return False
