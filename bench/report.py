"""The report: markdown tables from one invocation's results, and the targets met or missed."""

from __future__ import annotations

import dataclasses
import json
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.conversation import model_steps
from bench.drivers import IN_PROCESS, LABELS, VARIANTS
from bench.measure import History, Parked, Recovery, Resume, Sample

LOOP = "temporal_loop"
LANGGRAPH = "langgraph"
LANGGRAPH_SYNC = "langgraph_sync"
KEELS = ("keel", "keel_local")
MB = 1024 * 1024


def quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    if not s:
        return float("nan")
    pos = (len(s) - 1) * q
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def med(xs: Sequence[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def mean(xs: Sequence[float]) -> float:
    """CPU time is read in 10 ms ticks: the mean over many runs is exact, a median is not."""
    return statistics.fmean(xs) if xs else float("nan")


def paired(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """a/b within each round: the ratio the shared noise cancels out of."""
    return [x / y for x, y in zip(a, b, strict=False) if y]


def ratio_text(a: Sequence[float], b: Sequence[float]) -> str:
    """Ratio of the medians, then the paired per-round ratios: median (p10–p90)."""
    if not a or not b:
        return "—"
    pr = paired(a, b)
    return (
        f"{med(a) / med(b):.2f}× (paired {med(pr):.2f}×, "
        f"{quantile(pr, 0.1):.2f}–{quantile(pr, 0.9):.2f})"
    )


def ms(x: float) -> str:
    return f"{x * 1000:.1f} ms"


def count(n: int | None) -> str:
    """A count, or a dash for one a run (from before it was measured) did not record."""
    return "—" if n is None else f"{n:,}"


@dataclass
class Results:
    meta: dict[str, str]
    scale: dict[str, int]
    unavailable: dict[str, str] = field(default_factory=dict)
    latency: dict[int, dict[str, list[Sample]]] = field(default_factory=dict)
    throughput: dict[int, dict[str, list[Sample]]] = field(default_factory=dict)
    breakdown: dict[str, History] = field(default_factory=dict)
    history: dict[str, History] = field(default_factory=dict)  # key, or key + " (storage off)"
    history_points: tuple[int, ...] = ()
    parked: dict[str, Parked] = field(default_factory=dict)
    approvals: dict[str, Resume] = field(default_factory=dict)
    recovery: dict[str, Recovery] = field(default_factory=dict)
    errors: dict[str, str] = field(default_factory=dict)  # a section that failed, and why
    streaming: dict[str, Any] | None = None  # bench.streaming's results, as saved
    api: dict[str, Any] | None = None  # bench.api's results (keel serve), as saved
    burst: dict[str, Any] | None = None  # bench.burst's results (a burst of messages)

    def per_step(self, k: int, key: str) -> list[float]:
        return [s.seconds / model_steps(k) for s in self.latency.get(k, {}).get(key, [])]

    def runs_per_s(self, n: int, key: str) -> list[float]:
        return [n / s.seconds for s in self.throughput.get(n, {}).get(key, [])]


def save(r: Results, path: Path) -> None:
    """The raw results, to render again (`--render`) or to read."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dataclasses.asdict(r), indent=1), encoding="utf-8")


def load(path: Path) -> Results:
    d: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))

    def samples(by: dict[str, dict[str, list[dict[str, float]]]]) -> dict[int, Any]:
        return {
            int(n): {key: [Sample(**x) for x in xs] for key, xs in v.items()} for n, v in by.items()
        }

    return Results(
        meta=d["meta"],
        scale=d["scale"],
        unavailable=d["unavailable"],
        latency=samples(d["latency"]),
        throughput=samples(d["throughput"]),
        breakdown={k: History(**v) for k, v in d["breakdown"].items()},
        history={k: History(**v) for k, v in d["history"].items()},
        history_points=tuple(d["history_points"]),
        parked={k: Parked(**v) for k, v in d["parked"].items()},
        approvals={k: Resume(**v) for k, v in d["approvals"].items()},
        recovery={k: Recovery(**v) for k, v in d["recovery"].items()},
        errors=d["errors"],
        streaming=d.get("streaming"),
        api=d.get("api"),
        burst=d.get("burst"),
    )


def label(key: str) -> str:
    return LABELS.get(key, key)


# --------------------------------------------------------------------------- sections


def targets(r: Results) -> list[str]:
    k = max(r.latency) if r.latency else 20
    lines = [
        "| target | measured (one invocation, side by side) | verdict |",
        "|---|---|---|",
    ]

    def verdict(ok: bool | None, spread: tuple[float, float] | None = None, at: float = 0) -> str:
        """Met or missed on the paired median; "borderline" when the threshold lies inside
        the paired p10–p90 range (another invocation may well say otherwise)."""
        if ok is None:
            return "—"
        word = "**met**" if ok else "**missed**"
        if spread is not None and spread[0] <= at <= spread[1]:
            word += " (borderline: inside the p10–p90 range)"
        return word

    def spread(a: Sequence[float], b: Sequence[float]) -> tuple[float, float]:
        pr = paired(a, b)
        return quantile(pr, 0.1), quantile(pr, 0.9)

    for key in KEELS:
        if key not in r.latency.get(k, {}):
            continue
        keel = r.per_step(k, key)
        name = label(key)
        if LOOP in r.latency[k]:
            loop = r.per_step(k, LOOP)
            ok = med(paired(keel, loop)) <= 1.1 if keel and loop else None
            lines.append(
                f"| {name}: per model step ≤ 1.1× the hand-written Temporal loop at K={k} "
                f"| {ms(med(keel))} vs {ms(med(loop))}: {ratio_text(keel, loop)} "
                f"| {verdict(ok, spread(keel, loop), 1.1)} |"
            )
        if LANGGRAPH in r.latency[k]:
            lg = r.per_step(k, LANGGRAPH)
            ok = med(paired(keel, lg)) <= 2.0 if keel and lg else None
            lines.append(
                f"| {name}: per model step ≤ 2× LangGraph + SQLite at K={k} "
                f"| {ms(med(keel))} vs {ms(med(lg))}: {ratio_text(keel, lg)} "
                f"| {verdict(ok, spread(keel, lg), 2.0)} |"
            )
        for n in sorted(r.throughput):
            a, b = r.runs_per_s(n, key), r.runs_per_s(n, LOOP)
            if a and b:
                ok = med(paired(a, b)) >= 0.95
                lines.append(
                    f"| {name}: throughput with {n} runs at once ≥ 0.95× the hand-written loop "
                    f"| {med(a):.1f} vs {med(b):.1f} runs/s: {ratio_text(a, b)} "
                    f"| {verdict(ok, spread(a, b), 0.95)} |"
                )
    h = r.history.get("keel")
    if h is not None and r.history_points:
        pts = [h.per_step(p) for p in r.history_points]
        ok = pts[-1] <= pts[0] * 1.1
        shown = " → ".join(f"{x:,.0f}" for x in pts)
        lines.append(
            f"| Keel: history bytes per step flat from step {r.history_points[0]} to "
            f"{r.history_points[-1]}, payload storage on | {shown} bytes | {verdict(ok)} |"
        )
    p = r.parked.get("keel")
    if p is not None:
        ok = p.rss_parked < 500 * MB
        lines.append(
            f"| Keel: {p.runs:,} runs parked on an approval, worker memory < 500 MB "
            f"| {p.rss_parked / MB:.0f} MB RSS ({p.rss_idle / MB:.0f} MB before) | {verdict(ok)} |"
        )
    ap = r.approvals
    if "keel_update" in ap and "bare_signal" in ap:
        keel, bare = med(ap["keel_update"].to_model), med(ap["bare_signal"].to_model)
        lines.append(
            f"| Keel: approval-to-resume p50 ≤ 1.5× a bare signal round trip "
            f"| {ms(keel)} vs {ms(bare)}: {keel / bare:.2f}× | {verdict(keel <= 1.5 * bare)} |"
        )
    return lines + [""]


def headline(r: Results) -> list[str]:
    ks = sorted(r.latency)
    ns = sorted(r.throughput)
    kmax = ks[-1] if ks else 0
    head = ["system"]
    head += [f"ms per model step, K={k}" for k in ks]
    others = [LOOP, LANGGRAPH] + (
        [LANGGRAPH_SYNC] if LANGGRAPH_SYNC in r.latency.get(kmax, {}) else []
    )
    if kmax:
        head += [f"× {label(o)}, K={kmax}" for o in others]
    head += [f"runs/s, {n} at once" for n in ns]
    if kmax:
        head += [f"CPU per run, K={kmax}: worker + server"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    keys = [k for k in LABELS if k not in VARIANTS and any(k in r.latency.get(kk, {}) for kk in ks)]
    for key in keys:
        row = [label(key)]
        row += [ms(med(r.per_step(k, key))) for k in ks]
        if kmax:
            mine = r.per_step(kmax, key)
            for other in others:
                theirs = r.per_step(kmax, other)
                row.append(f"{med(mine) / med(theirs):.2f}×" if mine and theirs else "—")
        row += [f"{med(r.runs_per_s(n, key)):.1f}" for n in ns]
        if kmax:
            samples = r.latency[kmax].get(key, [])
            w = mean([s.worker_cpu for s in samples])
            sv = mean([s.server_cpu for s in samples])
            row.append(f"{w * 1000:.0f} + {sv * 1000:.0f} ms")
        lines.append("| " + " | ".join(row) + " |")
    for key, why in r.unavailable.items():
        lines.append(f"| {label(key)} | " + " | ".join(["—"] * (len(head) - 1)) + " |")
        _ = why
    return lines + [""]


def latency_tables(r: Results) -> list[str]:
    lines: list[str] = []
    for k, by in sorted(r.latency.items()):
        rounds = max((len(v) for v in by.values()), default=0)
        lines += [
            f"#### K={k}: {model_steps(k)} model calls and {k} tool calls per run, "
            f"{rounds} interleaved rounds",
            "",
            "| system | run, median | run, p90 | per model step | vs hand-written loop "
            "| vs LangGraph |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for key, samples in by.items():
            xs = [s.seconds for s in samples]
            lines.append(
                f"| {label(key)} | {ms(med(xs))} | {ms(quantile(xs, 0.9))} "
                f"| {ms(med(xs) / model_steps(k))} "
                f"| {ratio_text(xs, [s.seconds for s in by.get(LOOP, [])]) if key != LOOP else '1'} "
                f"| {ratio_text(xs, [s.seconds for s in by.get(LANGGRAPH, [])]) if key != LANGGRAPH else '1'} |"
            )
        lines.append("")
    return lines


def overhead_tables(r: Results) -> list[str]:
    """Each way of running Keel against Keel's default and the plain loop, in the same
    latency rounds: what waiting through `AgentClient`, or payload storage, adds."""
    lines: list[str] = []
    for k, by in sorted(r.latency.items()):
        keys = [key for key in ("keel", *VARIANTS) if key in by]
        if "keel" not in keys or len(keys) < 2:
            continue
        steps = model_steps(k)
        base = [s.seconds for s in by["keel"]]
        plain = [s.seconds for s in by.get("plain", [])]
        lines += [
            f"#### K={k}",
            "",
            "| Keel | run, median | per model step | over the plain loop, per model step "
            "| vs Keel (default) |",
            "|---|---:|---:|---:|---:|",
        ]
        for key in keys:
            xs = [s.seconds for s in by[key]]
            over = ms((med(xs) - med(plain)) / steps) if plain else "—"
            vs = ratio_text(xs, base) if key != "keel" else "1"
            lines.append(
                f"| {label(key)} | {ms(med(xs))} | {ms(med(xs) / steps)} | {over} | {vs} |"
            )
        lines.append("")
    return lines


def cpu_table(r: Results) -> list[str]:
    lines = [
        "| system | runs | K | worker CPU per run | server CPU per run | fake endpoint CPU per run "
        "| worker + server per model step |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    rows: list[tuple[str, str, int, list[Sample], int]] = []
    for k, by in sorted(r.latency.items()):
        rows += [(key, "one at a time", k, samples, 1) for key, samples in by.items()]
    k_tp = r.scale.get("throughput_k", 5)
    for n, by in sorted(r.throughput.items()):
        rows += [(key, f"{n} at once", k_tp, samples, n) for key, samples in by.items()]
    for key, how, k, samples, n in rows:
        w = mean([s.worker_cpu / n for s in samples])
        sv = mean([s.server_cpu / n for s in samples])
        m = mean([s.model_cpu / n for s in samples])
        server = f"{sv * 1000:.1f} ms" if key not in IN_PROCESS else "— (none)"
        lines.append(
            f"| {label(key)} | {how} | {k} | {w * 1000:.1f} ms | {server} | {m * 1000:.1f} ms "
            f"| {(w + sv) * 1000 / model_steps(k):.2f} ms |"
        )
    return lines + [""]


def throughput_table(r: Results) -> list[str]:
    k = r.scale.get("throughput_k", 5)
    lines = [
        "| system | runs at once | rounds | batch, median | runs/s | model steps/s "
        "| vs hand-written loop (runs/s) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for n, by in sorted(r.throughput.items()):
        for key, samples in by.items():
            rps = r.runs_per_s(n, key)
            vs = ratio_text(rps, r.runs_per_s(n, LOOP)) if key != LOOP else "1"
            lines.append(
                f"| {label(key)} | {n} | {len(samples)} | {ms(med([s.seconds for s in samples]))} "
                f"| {med(rps):.1f} | {med(rps) * model_steps(k):.0f} | {vs} |"
            )
    return lines + [""]


def breakdown_table(r: Results, k: int) -> list[str]:
    if not r.breakdown:
        return []
    keys = list(r.breakdown)
    lines = [
        "| per run, median of the K="
        + str(k)
        + " latency runs | "
        + " | ".join(label(x) for x in keys)
        + " |",
        "|---" + "|---:" * len(keys) + "|",
    ]
    rows = [
        ("workflow span (first → last event)", lambda h: ms(h.span)),
        ("workflow tasks", lambda h: f"{h.wft}"),
        ("workflow tasks waiting for the worker (Σ)", lambda h: ms(h.wft_wait)),
        ("workflow tasks running on the worker (Σ)", lambda h: ms(h.wft_run)),
        ("… per workflow task", lambda h: ms(h.wft_run / max(h.wft, 1))),
        ("activities", lambda h: f"{h.activities}"),
        ("activities, scheduled → completed (Σ)", lambda h: ms(h.activity)),
        ("history events", lambda h: f"{h.events}"),
        ("history bytes", lambda h: f"{h.total_bytes:,}"),
        ("payloads in payload storage (references in the history)", lambda h: count(h.stored)),
    ]
    for name, fn in rows:
        lines.append(f"| {name} | " + " | ".join(fn(r.breakdown[x]) for x in keys) + " |")
    return lines + [""]


def history_table(r: Results) -> list[str]:
    pts = r.history_points
    lines = [
        "| system | "
        + " | ".join(f"bytes added by step {p}" for p in pts)
        + " | whole history | events | runs (continue-as-new) | payloads in storage "
        "| run wall time |",
        "|---" + "|---:" * (len(pts) + 5) + "|",
    ]
    for key, h in r.history.items():
        base, _, how = key.partition("|")
        name = label(base) + (f" — {how}" if how else "")
        lines.append(
            f"| {name} | "
            + " | ".join(f"{h.per_step(p):,.0f}" for p in pts)
            + f" | {h.total_bytes:,} | {h.events:,} | {h.runs} | {count(h.stored)} "
            f"| {h.seconds:.1f} s |"
        )
    return lines + [""]


def parked_table(r: Results) -> list[str]:
    lines = [
        "| system | runs parked | worker RSS before | worker RSS parked | per parked run "
        "| time to park them all |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, p in r.parked.items():
        per = (p.rss_parked - p.rss_idle) / max(p.runs, 1) / 1024
        lines.append(
            f"| {label(key)} | {p.runs:,} | {p.rss_idle / MB:.0f} MB | {p.rss_parked / MB:.0f} MB "
            f"| {per:.0f} KiB | {p.seconds:.1f} s |"
        )
    return lines + [""]


APPROVAL_LABELS = {
    "keel_update": "Keel: `AgentClient.decide` (update; the default) → next model request",
    "keel_signal": "Keel: `AgentClient.decide(wait=False)` (the `keel.decide` signal) → next "
    "model request",
    "loop_signal": "hand-written loop: `approve` signal → tool activity → next model request",
    "bare_signal": "bare signal round trip: signal → model activity",
}


def approvals_table(r: Results) -> list[str]:
    bare = r.approvals.get("bare_signal")
    lines = [
        "| path | samples | p50 | p90 | vs bare signal (p50) | client call returned, p50 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for key, res in r.approvals.items():
        vs = f"{med(res.to_model) / med(bare.to_model):.2f}×" if bare else "—"
        lines.append(
            f"| {APPROVAL_LABELS[key]} | {len(res.to_model)} | {ms(med(res.to_model))} "
            f"| {ms(quantile(res.to_model, 0.9))} | {vs} | {ms(med(res.client_call))} |"
        )
    return lines + [""]


def recovery_table(r: Results) -> list[str]:
    lines = [
        "| system | runs | worker restart | kill → its next model request, min / p50 / p90 / max "
        "| kill → its next step, min / p50 / p90 / max | completed "
        "| model calls done again (runs with any) |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def dist(xs: list[float]) -> str:
        if not xs:
            return "—"
        return f"{min(xs):.1f} / {med(xs):.1f} / {quantile(xs, 0.9):.1f} / {max(xs):.1f} s"

    for key, rec in r.recovery.items():
        again = [max(0, c - (rec.k + 1)) for c in rec.model_calls]
        redone = f"{sum(again)} ({sum(1 for x in again if x)} of {rec.runs})"
        done = f"{rec.completed}/{rec.runs}" + (f" ({rec.error})" if rec.error else "")
        lines.append(
            f"| {label(key)} | {rec.runs} | {rec.restart:.1f} s | {dist(rec.to_progress)} "
            f"| {dist(rec.to_next_step)} | {done} | {redone} |"
        )
    lines.append(f"| {label('plain')} | — | — | — | — | 0: a killed process loses its runs | — |")
    return lines + [""]


def render(r: Results) -> str:
    kmax = max(r.latency) if r.latency else 20
    out = [
        f"Measured {r.meta['date']} by `{r.meta['command']}` in {r.meta['wall']}.",
        "",
        f"- machine: {r.meta['machine']}",
        f"- versions: {r.meta['versions']}",
        f"- Keel: commit {r.meta['keel']}",
        f"- scale: {r.meta['scale']}",
        "",
    ]
    if r.unavailable:
        out += ["Not measured here:", ""]
        out += [f"- {label(k)}: {why}" for k, why in r.unavailable.items()]
        out.append("")
    if r.errors:
        out += ["Sections that failed in this invocation:", ""]
        out += [f"- {k}: {why}" for k, why in r.errors.items()]
        out.append("")
    out += ["### Targets", ""] + targets(r)
    out += ["### Side by side", ""] + headline(r)
    out += ["### Latency per conversation", ""] + latency_tables(r)
    overhead = overhead_tables(r)
    if overhead:
        out += ["### Keel's own overhead, one way of running it at a time", ""] + overhead
    out += ["### CPU per run (from /proc: user + system time)", ""] + cpu_table(r)
    out += ["### Throughput", ""] + throughput_table(r)
    out += [f"### Where a run's time goes (event times in its history, K={kmax})", ""]
    out += breakdown_table(r, kmax)
    threshold = r.scale.get("payload_threshold", 0)
    out += [
        f"### History bytes per step (payload storage on, threshold {threshold:,} bytes, "
        "unless said)",
        "",
    ]
    out += history_table(r)
    out += ["### Worker memory with runs parked on an approval", ""] + parked_table(r)
    out += ["### Approval to resume", ""] + approvals_table(r)
    out += ["### Recovery after the worker is SIGKILLed", ""] + recovery_table(r)
    return "\n".join(out).rstrip() + "\n"
