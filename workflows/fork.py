"""Forking a run after step N (`keel fork`): a new run that starts from the state another
run had when its step N ended.

What the fork starts with, read from the origin's record by the `keel.load_fork` activity
(the worker reads it, so a client cannot hand a run a made-up past):

- the transcript up to the end of step N's tool results (messages delivered after step N
  are not part of it: the fork's own message, if any, comes next);
- the usage of the model replies up to step N, and the step counter at N (the fork's first
  model call is step N+1, and its budgets count from there);
- the origin's spec snapshot (tools, limits, policy), unless the fork asks for the agent's
  current spec;
- the origin's effects of steps 1..N, listed as inherited: done there, never redone here.

The inherited effects are read from the origin's state view, which shows its latest 300
effects: an origin with more lists only those of them up to step N (its own record keeps
them all).

The fork has a run key of its own, so every tool call it makes gets a new idempotency key:
an effect the origin made after step N is not undone, and a call the fork makes again is a
new effect.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError

with workflow.unsafe.imports_passed_through():
    from keel.workflows import errors
    from keel.workflows.models import (
        LOAD_FORK,
        AgentInput,
        AgentSpec,
        AgentState,
        ChatMessage,
        Effect,
        ForkInput,
        ForkOrigin,
        ForkState,
        Usage,
    )

FORK_REFUSED = "ForkRefused"  # the ApplicationError type of a fork that cannot be made
LOAD_FORK_TIMEOUT = timedelta(seconds=60)  # reading a long origin's transcript, page by page


class ForkError(ValueError):
    """Why a run cannot be forked after that step."""


def state_after(
    transcript: list[ChatMessage], step: int, total: Usage
) -> tuple[list[ChatMessage], Usage]:
    """The transcript as it stood when step `step` ended (its reply and that reply's tool
    results), and the usage up to then. Messages recorded before replies carried their step
    are numbered by their order; their usage is unknown, so the origin's whole usage is
    counted (a budget is never undercounted)."""
    at, ordinal, usage, known = -1, 0, Usage(), True
    for i, m in enumerate(transcript):
        if m.role != "assistant":
            continue
        ordinal += 1
        n = m.step or ordinal
        if n > step:
            break
        if m.usage is None:
            known = False
        else:
            usage = usage.add(m.usage)
        if n == step:
            at = i
    if at < 0:
        raise ForkError(
            f"step {step} left no reply in the run's transcript (interrupted before the "
            "model answered, or rolled back): fork after another step"
        )
    calls = {c.id for c in transcript[at].tool_calls}
    end = at + 1
    while end < len(transcript) and transcript[end].role == "tool":
        end += 1
    missing = calls - {m.tool_call_id for m in transcript[at + 1 : end]}
    if missing:
        raise ForkError(
            f"step {step} has not finished: tool call(s) {', '.join(sorted(missing))} have "
            "no result yet; fork after an earlier step, or once it has finished"
        )
    return transcript[:end], usage if known else total


def inherited(effects: list[Effect], step: int, origin: str) -> list[Effect]:
    """The origin's effects of steps 1..`step`, each naming the run whose record lists it."""
    return [e.model_copy(update={"run_id": e.run_id or origin}) for e in effects if e.step <= step]


async def load_fork(input: AgentInput, spec: AgentSpec) -> ForkState:
    """Read the origin's state after the step (an activity: the origin's record is I/O).
    A fork that cannot be made fails the run with the reason."""
    assert input.fork is not None
    request = ForkInput(origin=input.fork, agent=input.agent, user=input.user, policy=spec.policy)
    try:
        return await workflow.execute_activity(
            LOAD_FORK,
            request,
            result_type=ForkState,
            start_to_close_timeout=LOAD_FORK_TIMEOUT,
            retry_policy=RetryPolicy(maximum_attempts=3, non_retryable_error_types=[FORK_REFUSED]),
            summary=f"fork of {input.fork.run_id} after step {input.fork.step}",
        )
    except ActivityError as e:
        cause = e.cause
        why = cause.message if isinstance(cause, ApplicationError) else str(cause or e)
        raise errors.KeelError(f"cannot fork: {why}", type=FORK_REFUSED) from None


def begin_fork(st: AgentState, origin: ForkOrigin, got: ForkState) -> None:
    """Make a new run's state the origin's after the step (the caller has set the run key,
    so the fork's idempotency keys are its own)."""
    st.transcript = got.transcript
    st.usage = got.usage
    st.step = origin.step
    st.forked_from = origin
    st.inherited_effects = got.effects
    users = [i for i, m in enumerate(got.transcript) if m.role == "user"]
    st.turn_start = users[-1] if users else 1  # the turn step N was part of
