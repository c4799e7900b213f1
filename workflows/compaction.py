"""Context that fits, by compaction: a building block any loop calls before a model step.

When the next request would carry more than the agent's `Compaction.threshold_tokens`,
the oldest messages are summarised by a model call (the `keel.call_model` activity, retried
and recorded like any step, its tokens counted in the run's usage and budgets). The summary
is appended to the transcript as a marker (`ChatMessage.summarizes`): the transcript keeps
every message, and shows where the summary stands and what it covers; requests carry the
summary, in the instructions, in place of the messages it covers. A cut never falls between
a tool call and its result. Each summary covers all that came before it (the previous
summary is part of what it summarises), so only the latest marker counts. Watchers see a
`compacted` event. Without `Compaction` on the agent nothing changes: a conversation too
long for a request still loses its oldest turns from it (never from the record).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow
from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, CancelledError

from keel.workflows.budgets import limits_of, priced
from keel.workflows.events import EventKind, EventLog
from keel.workflows.models import (
    CALL_MODEL,
    AgentSpec,
    AgentState,
    ChatMessage,
    ModelInput,
    ModelResult,
)

SUMMARY_INSTRUCTIONS = (
    "You keep a long conversation short. Summarise the conversation you are given so that it "
    "can go on from your summary alone: the user's goals and requests, decisions taken, "
    "facts and results learnt from tools (with the exact figures and names), and what is "
    "still open. Write plain prose, no preamble."
)
# the summary request's user message starts with this (a scripted model's rule matches it)
SUMMARY_REQUEST = "Summarise this conversation:"
SUMMARY_HEADING = "Summary of the conversation so far (earlier messages are summarised):"
SUMMARY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=4,
)


def request_messages(transcript: list[ChatMessage]) -> list[ChatMessage]:
    """What a request carries of the transcript: with a summary marker, the instructions
    followed by the latest summary, then the messages it does not cover. Markers never go
    out as messages of their own."""
    marker = latest_summary(transcript)
    if marker is None:
        return transcript
    head = transcript[0]
    first = head.model_copy(
        update={"content": f"{head.content or ''}\n\n{SUMMARY_HEADING}\n{marker.content or ''}"}
    )
    return [first, *(m for m in transcript[marker.summarizes :] if not m.summarizes)]


def latest_summary(transcript: list[ChatMessage]) -> ChatMessage | None:
    """The latest summary marker, if the conversation was ever compacted."""
    return next((m for m in reversed(transcript) if m.summarizes), None)


def estimate_tokens(messages: list[ChatMessage]) -> int:
    """About how many tokens a request carries (4 characters a token, as providers bill
    English; a few per message for the framing)."""
    chars = sum(
        len(m.content or "") + sum(len(c.arguments) for c in m.tool_calls) for m in messages
    )
    return chars // 4 + 4 * len(messages)


def safe_cut(transcript: list[ChatMessage], i: int) -> bool:
    """Whether the messages before `i` can be summarised apart from those from `i` on: no
    tool result at `i` whose call would be cut off from it."""
    m, before = transcript[i], transcript[i - 1]
    return m.role != "tool" and not (before.role == "assistant" and before.tool_calls)


def cut_point(transcript: list[ChatMessage], start: int, keep: int) -> int | None:
    """The latest safe cut that leaves at least `keep` messages whole, past `start`."""
    for i in range(len(transcript) - keep, start, -1):
        if safe_cut(transcript, i):
            return i
    return None


def _render(previous: ChatMessage | None, covered: list[ChatMessage]) -> str:
    lines = [SUMMARY_REQUEST, ""]
    if previous is not None:
        lines += [f"(summary of what came before) {previous.content or ''}", ""]
    for m in covered:
        who = f"tool {m.name or ''}".strip() if m.role == "tool" else m.role
        calls = "".join(f" [calls {c.name}({c.arguments})]" for c in m.tool_calls)
        lines.append(f"{who}: {m.content or ''}{calls}")
    return "\n".join(lines)


async def compact(spec: AgentSpec, state: AgentState, events: EventLog | None = None) -> bool:
    """Summarise the oldest messages if the next request would pass the agent's threshold;
    True when it did. A summary call that fails leaves the context as it was (the run goes
    on; the request is cut as before); a cancellation propagates."""
    c = spec.compaction
    if c is None or estimate_tokens(request_messages(state.transcript)) <= c.threshold_tokens:
        return False
    previous = latest_summary(state.transcript)
    start = previous.summarizes if previous else 1
    cut = cut_point(state.transcript, start, c.keep_last_messages)
    if cut is None:
        return False
    covered = [m for m in state.transcript[start:cut] if not m.summarizes]
    settings = spec.model.model_copy(update={"stream": False, "fallbacks": []})
    request = ModelInput(
        agent=spec.name,
        step=state.step,
        settings=settings,
        messages=[
            ChatMessage(role="system", content=c.instructions or SUMMARY_INSTRUCTIONS),
            ChatMessage(role="user", content=_render(previous, covered)),
        ],
    )
    try:
        result: ModelResult = await workflow.execute_activity(
            CALL_MODEL,
            request,
            task_queue=spec.model_task_queue or None,
            result_type=ModelResult,
            start_to_close_timeout=timedelta(seconds=settings.timeout_seconds + 5),
            heartbeat_timeout=timedelta(seconds=5),
            retry_policy=SUMMARY_RETRY,
            summary=f"compact {cut - 1} messages · step {state.step}",
        )
    except ActivityError as e:
        if isinstance(e.cause, CancelledError):
            raise
        return False
    usage = priced(result.usage, limits_of(spec, state).prices, settings.model, result.model)
    state.usage = state.usage.add(usage)
    text = result.message.content or ""
    state.transcript.append(
        ChatMessage(role="system", content=text, summarizes=cut, model=result.model or None)
    )
    if events is not None:
        events.emit(
            EventKind.COMPACTED,
            step=state.step,
            text=text,
            detail=f"messages 1-{cut - 1} summarised",
            model=result.model,
            tokens=usage.total_tokens,
        )
    return True
