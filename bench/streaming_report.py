"""The "Streamed replies" report: markdown tables from `bench.streaming`'s results."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from bench.conversation import PIECE, model_steps
from bench.measure import Sample
from bench.report import mean, med, ms, paired, quantile, ratio_text
from bench.streaming import StreamingResults, Watched

FIRST_DELTA_TARGET = 0.150  # seconds, p50
BATCHES_PER_SECOND_TARGET = 10.0  # one batch per 100 ms of streaming
STEP_RATIO_TARGET = 1.10


def values(ws: Sequence[Watched], f: Callable[[Watched], float | None]) -> list[float]:
    return [x for x in (f(w) for w in ws) if x is not None]


def p50_p90(xs: Sequence[float]) -> str:
    return f"{ms(med(xs))} | {ms(quantile(xs, 0.9))}" if xs else "— | —"


def rate(w: Watched) -> float | None:
    return w.signals / w.streamed_for if w.streamed_for else None


def per_step(samples: Sequence[Sample], k: int) -> list[float]:
    return [s.seconds / model_steps(k) for s in samples]


def verdict(ok: bool, low: float = 0, high: float = 0, at: float = 0) -> str:
    word = "**met**" if ok else "**missed**"
    if low <= at <= high and high > low:
        word += " (borderline: inside the p10–p90 range)"
    return word


def render(s: StreamingResults) -> str:
    sc = s.scale
    on, off = s.watched.get("on", []), s.watched.get("off", [])
    size = len(PIECE.format(0))
    chunks = sc["pieces"] + 3  # the role's, one a piece, the finish, the usage
    first = values(on, lambda w: w.first_piece)
    rates = values(on, rate)
    fast_k, slow_k = sc["fast_k"], sc["slow_k"]
    step_rows = [
        (f"fast (written at once), K={fast_k}", fast_k, "fast"),
        (f"written over {sc['slow_over_ms']} ms each, K={slow_k}", slow_k, "slow"),
    ]

    out = [
        "### Streamed replies",
        "",
        f"Measured {s.meta['date']} by `{s.meta['command']}`"
        + (f" in {s.meta['wall']}" if s.meta.get("wall") else "")
        + f": {sc['rounds']} interleaved rounds, one run at a time, on a fake endpoint and a "
        "Keel worker of their own (one worker serves the agent with streaming on and the same "
        "agent with `ModelSettings(stream=False)`).",
        "",
    ]
    for key in ("machine", "keel"):
        if s.meta.get(key):
            out.append(f"- {key}: {s.meta[key]}")
    out += [
        f"- the watched reply: {sc['pieces']} pieces of text ({sc['pieces'] * size:,} "
        f"characters), its first chunk {sc['delay_ms']} ms after the request, then written "
        f"over {sc['over_ms'] / 1000:.1f} s ({chunks} chunks, "
        f"{sc['over_ms'] / (chunks - 1):.0f} ms apart; the first is the role's, with no "
        "text); a client follows the run with `AgentClient.events` from its start. Streaming "
        "off, the endpoint sends the whole reply at the time it would have sent the last chunk.",
        "",
        "| target | measured | verdict |",
        "|---|---|---|",
    ]
    if first:
        p50 = med(first)
        out.append(
            f"| provider's first token → a client's first `model_delta`, p50 ≤ "
            f"{FIRST_DELTA_TARGET * 1000:.0f} ms | {ms(p50)} (p90 {ms(quantile(first, 0.9))}) "
            f"| {verdict(p50 <= FIRST_DELTA_TARGET)} |"
        )
    if rates:
        r50 = med(rates)
        out.append(
            f"| ≤ one `keel.model_stream` batch per 100 ms of streaming | {r50:.1f} batches/s "
            f"(max {max(rates):.1f}) | {verdict(r50 <= BATCHES_PER_SECOND_TARGET)} |"
        )
    for name, k, key in step_rows:
        a = per_step(s.steps.get(f"{key}_on", []), k)
        b = per_step(s.steps.get(f"{key}_off", []), k)
        if not a or not b:
            continue
        pr = paired(a, b)
        lo, hi = quantile(pr, 0.1), quantile(pr, 0.9)
        out.append(
            f"| per model step, streaming on ≤ {STEP_RATIO_TARGET:.1f}× off: replies {name} "
            f"| {ms(med(a))} vs {ms(med(b))}: {ratio_text(a, b)} "
            f"| {verdict(med(pr) <= STEP_RATIO_TARGET, lo, hi, STEP_RATIO_TARGET)} |"
        )
    out += ["", "#### When a client sees the reply", "", "| | p50 | p90 |", "|---|---:|---:|"]
    rows: list[tuple[str, list[float]]] = [
        ("streaming on: provider's first piece of text → client's first `model_delta`", first),
        (
            "streaming on: provider's first chunk (the role's) → client's first `model_delta`",
            values(on, lambda w: w.first_chunk),
        ),
        (
            "streaming on: each piece, provider → client (every piece of every run)",
            [x for w in on for x in w.piece_lags],
        ),
        (
            "streaming on: provider starts writing → client's `model_reply`",
            values(on, lambda w: w.reply),
        ),
        (
            "streaming off: provider starts writing → client's `model_reply`",
            values(off, lambda w: w.reply),
        ),
        (
            "streaming on: provider's last chunk → client's `model_reply`",
            values(on, lambda w: w.reply_tail),
        ),
        (
            "streaming off: provider sends the whole reply → client's `model_reply`",
            values(off, lambda w: w.reply_tail),
        ),
    ]
    out += [f"| {name} | {p50_p90(xs)} |" for name, xs in rows]
    off_reply = values(off, lambda w: w.reply)
    if first and off_reply:
        out += [
            "",
            f"With streaming on, a client has the reply's first words {med(first) * 1000:.0f} ms "
            f"after the provider wrote them; with it off, the reply shows "
            f"{med(off_reply):.2f} s after the provider began to write "
            f"({med(first) / med(off_reply):.2f}× of that).",
        ]
    out += [
        "",
        "#### Where the first delta's time goes (streaming on, medians)",
        "",
        "| from → to | median |",
        "|---|---:|",
    ]
    to_signal = values(on, lambda w: w.to_signal)
    to_task = values(on, lambda w: w.to_task)
    rest = [
        w.first_piece - w.to_signal - w.to_task
        for w in on
        if w.first_piece is not None and w.to_signal is not None and w.to_task is not None
    ]
    out += [
        "| provider's first piece → the first `keel.model_stream` signal in the history (the "
        f"activity's first-batch wait, then the signal) | {ms(med(to_signal))} |",
        f"| that signal → the workflow task that turned it into events completed | "
        f"{ms(med(to_task))} |",
        f"| that task completed → the client has the delta (the poll's result) | {ms(med(rest))} |",
        "",
        "#### History per run (medians)",
        "",
        "| | streaming on | streaming off | on − off (paired) |",
        "|---|---:|---:|---:|",
    ]

    def hist_row(name: str, f: Callable[[Watched], float]) -> str:
        a, b = [f(w) for w in on], [f(w) for w in off]
        diff = [x - y for x, y in zip(a, b, strict=False)]
        return f"| {name} | {med(a):.0f} | {med(b):.0f} | {med(diff):+.0f} |"

    out += [
        hist_row("events", lambda w: w.events),
        hist_row("`keel.model_stream` signals", lambda w: w.signals),
        hist_row("workflow tasks", lambda w: w.tasks),
        hist_row("the watcher's polls (updates)", lambda w: w.polls),
        f"| streaming time (provider's first piece → last chunk) | "
        f"{med(values(on, lambda w: w.streamed_for or None)):.2f} s | — | — |",
        f"| batches per second of streaming | {med(rates):.1f} | — | — |",
        "",
        "#### Per model step, streaming on and off",
        "",
        "| replies | streaming on | streaming off | on / off (paired, p10–p90) "
        "| CPU per run, on: worker + server | off: worker + server |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for name, k, key in step_rows:
        sa, sb = s.steps.get(f"{key}_on", []), s.steps.get(f"{key}_off", [])
        if not sa or not sb:
            continue
        a, b = per_step(sa, k), per_step(sb, k)

        def cpu(xs: Sequence[Sample]) -> str:
            w, sv = mean([x.worker_cpu for x in xs]), mean([x.server_cpu for x in xs])
            return f"{w * 1000:.0f} + {sv * 1000:.0f} ms"

        out.append(
            f"| {name} | {ms(med(a))} | {ms(med(b))} | {ratio_text(a, b)} | {cpu(sa)} | {cpu(sb)} |"
        )
    return "\n".join(out).rstrip() + "\n"
