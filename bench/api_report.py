"""The "keel serve" report: markdown tables from `bench.api`'s results."""

from __future__ import annotations

from collections.abc import Sequence

from bench.api import ApiResults, Watch
from bench.report import MB, med, ms, quantile, ratio_text

ADDED_TARGET = 0.005  # seconds, p50 of HTTP minus AgentClient
RESUME_TARGET = 1.2  # approval → next model request, against a bare signal round trip
OPS = {
    "me": "the caller: `GET /api/me` / nothing (HTTP and the token check alone)",
    "status": "a run's status: `GET /api/runs/{id}` / `AgentClient.status`",
    "list": "the runs: `GET /api/runs` / `AgentClient.list`",
    "message": "a message: `POST /api/runs/{id}/messages` / `AgentClient.send_message`",
    "decide": "a decision (approve): `POST /api/runs/{id}/approvals/{call}` / `AgentClient.decide`",
}
WATCHES = {
    "one": "one run, one client",
    "fan_out": "one run, {clients} clients",
    "many_runs": "{runs} runs, one client each",
}


def word(ok: bool) -> str:
    return "**met**" if ok else "**missed**"


def p50_p90(xs: Sequence[float]) -> str:
    return f"{ms(med(xs))} / {ms(quantile(xs, 0.9))}" if xs else "— / —"


def calls(s: ApiResults) -> list[str]:
    out = [
        "| operation (HTTP / direct) | samples | HTTP p50 / p90 | `AgentClient` p50 / p90 | "
        "added, p50 (paired) | target ≤ 5 ms |",
        "|---|---:|---:|---:|---:|---|",
    ]
    for op, label in OPS.items():
        http, direct = s.calls.get(f"{op}_http", []), s.calls.get(f"{op}_direct", [])
        if not http or not direct:
            continue
        if op == "me":
            out.append(f"| {label} | {len(http)} | {p50_p90(http)} | — | — | — |")
            continue
        added = med(http) - med(direct)
        pairs = med([a - b for a, b in zip(http, direct, strict=False)])
        out.append(
            f"| {label} | {len(http)} | {p50_p90(http)} | {p50_p90(direct)} | "
            f"{ms(added)} ({ms(pairs)}) | {word(added <= ADDED_TARGET)} |"
        )
    return out


RESUME_PATHS = {
    "keel_update": "Keel: `AgentClient.decide` (the `keel.decide_approval` update first) → "
    "tool activity → next model request",
    "loop_signal": "hand-written loop: `approve` signal → tool activity → next model request",
    "bare_signal": "bare signal round trip: signal → model activity",
}


def resume(s: ApiResults) -> list[str]:
    bare = s.resume.get("bare_signal", [])
    out = ["| path | samples | p50 | p90 | vs bare signal |", "|---|---:|---:|---:|---:|"]
    for key, label in RESUME_PATHS.items():
        xs = s.resume.get(key, [])
        if xs:
            out.append(
                f"| {label} | {len(xs)} | {ms(med(xs))} | {ms(quantile(xs, 0.9))} | "
                f"{ratio_text(xs, bare)} |"
            )
    update = s.resume.get("keel_update", [])
    if update and bare:
        ratio = med(update) / med(bare)
        out += [
            "",
            f"Keel against the bare signal: {ratio:.2f}× the medians; target ≤ "
            f"{RESUME_TARGET:.1f}×: {word(ratio <= RESUME_TARGET)} (before `decide` sent the "
            "update first: 2.3–2.4×).",
        ]
    return out


def watch_row(key: str, w: Watch) -> str:
    label = WATCHES[key].format(clients=w.clients, runs=w.runs)
    return (
        f"| {label} | {w.complete}/{w.clients} | {w.events} | {w.received:,} | "
        f"{p50_p90(w.delays)} | {w.serve_cpu:.1f} s in {w.seconds:.0f} s | {w.serve_rss_before / MB:.0f} → "
        f"{w.serve_rss_peak / MB:.0f} MB | {w.history:,} | {w.polls:,} | {w.signals} | "
        f"{w.errors} |"
    )


def watches(s: ApiResults) -> list[str]:
    out = [
        "| clients | every event, in order, once | events per run | received | "
        "event's time → receipt, p50 / p90 | keel serve CPU | keel serve RSS | "
        "history events (a run, median) | of them, watchers' polls | stream batches "
        "(signals) | `error` events |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    out += [watch_row(k, s.watch[k]) for k in WATCHES if k in s.watch]
    one = s.watch.get("one")
    for key in ("fan_out", "many_runs"):
        w = s.watch.get(key)
        if not w:
            continue
        label = WATCHES[key].format(clients=w.clients, runs=w.runs)
        if w.errors or w.complete < w.clients:
            out += [
                "",
                f"{label}: {w.clients - w.complete} of {w.clients} clients did not receive "
                f"every event; {w.errors} `error` events, the first: `{w.error[:300]}`",
            ]
        if key == "fan_out" and one:
            extra = w.history - one.history
            ok = not w.errors and extra <= max(10, one.history // 10)
            out += [
                "",
                f"History with {w.clients} clients on one run against one client: {w.history:,} "
                f"events against {one.history:,} ({extra:+,}); the watchers' polls "
                f"{w.polls:,} against {one.polls:,}. Target (every client served, no history "
                f"beyond the stream's own batches): {word(ok)}.",
            ]
    return out


def render(s: ApiResults) -> str:
    sc = s.scale
    out = [
        "### keel serve",
        "",
        f"Measured {s.meta['date']} by `{s.meta['command']}`"
        + (f" in {s.meta['wall']}" if s.meta.get("wall") else "")
        + f": {sc['rounds']} interleaved rounds of calls, {sc['approvals']} approval samples "
        "per path, on a fake endpoint, a Keel worker, a hand-written loop's worker (for the "
        "bare signal) and `keel serve` in a process of its own (no policy: the caller sees "
        "their own runs; no rate limit), all on one dev server.",
        "",
    ]
    for key in ("machine", "keel"):
        if s.meta.get(key):
            out.append(f"- {key}: {s.meta[key]}")
    out += [
        "",
        "#### What the API adds to a call",
        "",
        f"Each operation through `httpx.AsyncClient` (one connection kept alive, a bearer "
        f"token) against `keel serve` on loopback, and through `AgentClient` in the measuring "
        f"process (as the same user), one after the other, the order alternating; "
        f"{sc['calls']} status, list and message calls per round and path on a run waiting for "
        "an approval, one decision per round and path (each on a run of its own).",
        "",
        *calls(s),
        "",
        "#### Approval to resume",
        "",
        *resume(s),
        "",
        "#### Server-Sent Events",
        "",
        f"Each run streams a reply of {sc['pieces']} pieces written over "
        f"{sc['over_ms'] / 1000:.1f} s, {sc['delay_ms']} ms after its request; each client "
        "follows `GET /api/runs/{id}/events` from the run's start to its `ended` event. Delay: "
        "the event's `at` (the workflow's time) to the client's receipt, for events after the "
        "client connected. CPU and RSS of the `keel serve` process, from /proc, over the "
        "measurement.",
        "",
        *watches(s),
        "",
    ]
    return "\n".join(out)
