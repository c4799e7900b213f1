"""What queries answer: bounded views of a run's state (pure functions, no I/O)."""

from __future__ import annotations

from keel.workflows.models import AgentState, ChatMessage, RunState, TranscriptSlice

VIEW_TEXT_CHARS = 20_000  # a message's text in the state view, cut past this
VIEW_TRANSCRIPT_CHARS = 300_000  # the transcript's tail shown in the state view
PAGE_CHARS = 1_000_000  # a transcript page: whole messages, about this much text
VIEW_LIST_ITEMS = 300  # the latest entries of each record (audit, effects, decisions) shown
VIEW_QUEUED_CHARS = 2_000  # a queued message's text in the view
# What one model request carries of the conversation, in UTF-8 bytes (Temporal's limits are
# bytes: a character can take four): older turns past it are left out of the request (never
# out of the run's record)
MAX_CONTEXT_BYTES = 1_200_000
MAX_CONTEXT_CHARS = MAX_CONTEXT_BYTES  # the name it had when it counted characters


def utf8_len(text: str | None) -> int:
    """The bytes `text` takes in a payload (UTF-8; cheap for ASCII)."""
    if not text:
        return 0
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


def _cut(text: str | None, limit: int = VIEW_TEXT_CHARS) -> tuple[str | None, bool]:
    if text is None or len(text) <= limit:
        return text, False
    return text[:limit] + f"…[{len(text) - limit} more characters]", True


def state_view(state: AgentState) -> RunState:
    """The state with its transcript's tail (long texts cut), a cut final answer, the latest
    entries of its records and queued texts cut: well under a megabyte whatever the run's
    size, so queries at once stay far below gRPC's limit. (`keel.get_transcript` pages the
    whole transcript; the run itself keeps everything.)"""
    shown: list[ChatMessage] = []
    budget = VIEW_TRANSCRIPT_CHARS
    cut = False
    for m in reversed(state.transcript):
        content, was_cut = _cut(m.content)
        size = len(content or "") + sum(len(c.arguments) for c in m.tool_calls)
        if shown and size > budget:
            break
        shown.append(m.model_copy(update={"content": content}) if was_cut else m)
        cut = cut or was_cut
        budget -= size
    shown.reverse()
    answer, answer_cut = _cut(state.final_answer)
    queued = [
        q.model_copy(update={"text": _cut(q.text, VIEW_QUEUED_CHARS)[0]})
        for q in state.queued_messages
    ]
    tail = -VIEW_LIST_ITEMS
    lists = (state.audit, state.effects, state.decisions, state.retired_call_ids)
    cut = cut or any(len(x) > VIEW_LIST_ITEMS for x in lists)
    public = {name: getattr(state, name) for name in RunState.model_fields}
    return RunState(
        **public
        | {
            "transcript": shown,
            "final_answer": answer,
            "queued_messages": queued,
            "audit": state.audit[tail:],
            "effects": state.effects[tail:],
            "decisions": state.decisions[tail:],
            "retired_call_ids": state.retired_call_ids[tail:],
            "transcript_from": len(state.transcript) - len(shown),
            "transcript_of": len(state.transcript),
            "cut": cut or answer_cut,
        }
    )


def context_window(transcript: list[ChatMessage], limit: int) -> list[ChatMessage]:
    """What a model request carries: the whole transcript when it fits in `limit`
    bytes; else the instructions (saying that earlier messages are left out) and the
    latest turns that fit, starting at a user message so no tool result loses its call.
    The run's record keeps everything."""
    if sum(_size(m) for m in transcript) <= limit or len(transcript) < 3:
        return transcript
    head, rest = transcript[0], transcript[1:]
    budget = limit - _size(head)
    start: int | None = None
    used = 0
    for i in range(len(rest) - 1, -1, -1):
        used += _size(rest[i])
        if used > budget:
            break
        if rest[i].role == "user":
            start = i
    if start is None:  # the latest turn alone is over the limit: it goes whole, as it must
        users = [i for i, m in enumerate(rest) if m.role == "user"]
        start = users[-1] if users else len(rest) - 1
    note = f"\n\n[{start} earlier messages of this conversation are left out: too long]"
    first = head.model_copy(update={"content": (head.content or "") + note})
    return [first, *rest[start:]]


def message_bytes(m: ChatMessage) -> int:
    """The bytes of a message's text and its tool calls' arguments."""
    return utf8_len(m.content) + sum(utf8_len(c.arguments) for c in m.tool_calls)


_size = message_bytes


def transcript_slice(state: AgentState, start: int) -> TranscriptSlice:
    """Whole messages from `start`, at least one, up to about PAGE_CHARS of text."""
    start = max(start, 0)
    out: list[ChatMessage] = []
    size = 0
    for m in state.transcript[start:]:
        n = len(m.content or "") + sum(len(c.arguments) for c in m.tool_calls)
        if out and size + n > PAGE_CHARS:
            break
        out.append(m)
        size += n
    total = len(state.transcript)
    answer = state.final_answer if start >= total else None
    return TranscriptSlice(start=start, messages=out, total=total, final_answer=answer)
