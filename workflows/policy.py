"""Pure decisions the workflow makes: no I/O, no clock, unit-tested without a server."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from datetime import datetime
from typing import Any

import jsonschema

from keel.workflows.authz import effective_limits
from keel.workflows.models import (
    AgentSpec,
    AgentState,
    ApprovalMode,
    Condition,
    MessagePolicy,
    ToolSpec,
)

_OPS: dict[str, Callable[[Any, Any], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
    "==": operator.eq,
    "!=": operator.ne,
    "in": lambda a, b: a in b,
    "not in": lambda a, b: a not in b,
}


def parse_arguments(raw: str) -> tuple[dict[str, Any] | None, str]:
    """Decode a model's argument text into an object, or say what is wrong with it."""
    try:
        value = json.loads(raw or "{}")
    except json.JSONDecodeError as e:
        return None, f"arguments are not valid JSON ({e.msg} at position {e.pos}): {raw[:200]}"
    if not isinstance(value, dict):
        return None, f"arguments must be a JSON object, got {type(value).__name__}"
    return value, ""


def condition_holds(cond: Condition, args: dict[str, Any]) -> bool:
    """Whether one declared condition holds for these arguments.

    Fails closed: a condition that cannot be evaluated (field absent, type mismatch) holds,
    so a call the policy cannot judge goes to a person.
    """
    if cond.field not in args:
        return True
    try:
        return bool(_OPS[cond.op](args[cond.field], cond.value))
    except TypeError:
        return True


def approval_reason(tool: ToolSpec, args: dict[str, Any]) -> str | None:
    """Why this call needs a person's approval, or None when it may run as is."""
    policy = tool.approval
    if policy.mode == ApprovalMode.ALWAYS:
        return policy.reason or f"{tool.name} always needs approval"
    if policy.mode == ApprovalMode.WHEN:
        for cond in policy.when:
            if condition_holds(cond, args):
                return policy.reason or f"{tool.name}: {cond.field} {cond.op} {cond.value!r}"
    return None


_VALIDATORS: dict[str, Any] = {}  # schema (as canonical JSON) → its checked validator


def _validator(schema: dict[str, Any]) -> Any:
    """The validator of a tool's schema, built and checked once per process: checking a
    schema against its meta-schema costs far more than checking arguments against it."""
    key = json.dumps(schema, sort_keys=True)
    found = _VALIDATORS.get(key)
    if found is None:
        cls = jsonschema.validators.validator_for(schema)
        cls.check_schema(schema)
        found = _VALIDATORS.setdefault(key, cls(schema))
    return found


def validate_arguments(tool: ToolSpec, args: dict[str, Any]) -> str:
    """Check arguments against the tool's JSON schema: '' when valid, else what is wrong.
    A schema that is itself invalid (a hand-built ToolSpec) is said so, never raised: this
    runs in workflow code and in signal handlers, where an exception would retry forever."""
    if not tool.parameters:
        return ""
    try:
        validator = _validator(tool.parameters)
    except jsonschema.SchemaError as e:
        return f"the tool's own JSON schema is invalid, so no call can be checked: {e.message}"
    try:
        error = jsonschema.exceptions.best_match(validator.iter_errors(args))
    except Exception as e:  # e.g. a $ref it cannot resolve: the schema, not the arguments
        return f"the tool's own JSON schema cannot be evaluated: {e}"
    if error is not None:
        where = "/".join(str(p) for p in error.absolute_path) or "arguments"
        return f"{where}: {error.message}"
    return ""


def turn_in_flight(state: AgentState) -> bool:
    """Whether the agent is working on a turn (as opposed to idle or finished)."""
    return state.status in ("running", "waiting_approval", "waiting_provider")


def effective_policy(spec: AgentSpec | None, requested: MessagePolicy | None) -> MessagePolicy:
    """The policy a message gets: its own, or the agent's default (queue before the spec is
    loaded)."""
    return requested or (spec.message_policy if spec else MessagePolicy.QUEUE)


def budget_exhausted(spec: AgentSpec, state: AgentState, now: datetime) -> str:
    """Which budget is spent before the next model step ('' when none is); the user's roles
    may lower the agent's step and token limits."""
    limits = effective_limits(spec, state.user)
    if state.step >= limits.max_steps:
        return f"step budget spent: {state.step} of {limits.max_steps} model steps"
    if state.usage.total_tokens >= limits.max_tokens:
        return f"token budget spent: {state.usage.total_tokens} of {limits.max_tokens} tokens"
    return time_exhausted(spec, state, now)


def time_left(spec: AgentSpec, state: AgentState, now: datetime) -> float:
    """Seconds of working time the run has left (a sub-agent: never past its parent's)."""
    left = spec.limits.max_seconds
    if state.started_at is not None:
        left -= (now - state.started_at).total_seconds() - state.paused_seconds
    deadline = state.budget.deadline if state.budget else None
    return left if deadline is None else min(left, (deadline - now).total_seconds())


def time_exhausted(spec: AgentSpec, state: AgentState, now: datetime) -> str:
    """Whether the time budget is spent at `now` ('' when it is not)."""
    limit = spec.limits.max_seconds
    left = time_left(spec, state, now)
    if state.started_at is None or left > 0:
        return ""
    return (
        f"time budget spent: {limit - left:.0f}s of {limit:.0f}s "
        "(time waiting for people not counted)"
    )


def short_args(raw: str | dict[str, Any], limit: int = 60) -> str:
    """Arguments (the model's JSON text, or decoded) compacted for a summary:
    `order_id=A-1, amount=20.0`."""
    args, _ = parse_arguments(raw) if isinstance(raw, str) else (raw, "")
    if args is None:
        text = str(raw)
    else:
        text = ", ".join(f"{k}={json.dumps(v, ensure_ascii=False)}" for k, v in args.items())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def idempotency_key(run_key: str, step: int, index: int, *, safe: bool = True) -> str:
    """The key of the index-th tool call of a model step; stable across retries and restarts.

    It holds only lowercase hex digits, digits and `-` (`<run key>-<step>-<index>`, the run
    key a UUID), so a tool may use it as a file name or in a URL as it is. Runs recorded
    before keys were made safe (`safe=False`) keep `<run key>:<step>:<index>`."""
    sep = "-" if safe else ":"
    return f"{run_key}{sep}{step}{sep}{index}"
