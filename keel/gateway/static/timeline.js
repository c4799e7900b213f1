// A run's conversation as its events tell it: the reply appearing as it is written, each
// tool call and result, approvals asked and decided, messages, status changes, the end.

import { h, when } from "./dom.js";
import { statusText } from "./words.js";

const CUT = /… \[(\d+) more\]$/; // an event carries the start of a long text only

/** The text after the "who" label of a conversation entry. */
function entry(kind, who, at, ...body) {
  return h(
    "li",
    { class: `entry ${kind}` },
    h("p", { class: "who" }, h("span", {}, who), at ? h("time", { datetime: at }, when(at)) : null),
    ...body,
  );
}

export class Timeline {
  /** `list` is the conversation's log element; `whole(step, start)` finds a cut reply whole. */
  constructor(list, { agent = "Agent", whole = async () => null } = {}) {
    this.list = list;
    this.agent = agent;
    this.whole = whole;
    this.drafts = new Map(); // step → the reply being written
    this.lastStatus = "";
    this.first = null;
  }

  add(item) {
    this.list.append(item);
    return item;
  }

  /** The run's opening message (not an event: it is the run's input). */
  opening(user, text) {
    if (this.first) return;
    this.first = entry("user", user || "Message", null, h("p", { class: "text" }, text));
    this.list.prepend(this.first);
  }

  /** Say that the stream starts after events no longer kept. */
  gap() {
    const note = entry(
      "note",
      "Earlier events",
      null,
      h("p", {}, "Earlier events are no longer kept; the whole transcript is below."),
    );
    if (this.first) this.first.after(note);
    else this.list.prepend(note);
  }

  draft(step, attempt = 0, writing = false) {
    let d = this.drafts.get(step);
    if (d && d.done && writing) d = null; // another model call of the same step
    if (d && attempt > d.attempt && !d.done) {
      this.reset(d); // a new attempt writes from the start
      d.attempt = attempt;
    }
    if (d) return d;
    const text = h("p", { class: "text" });
    const calls = h("ul", { class: "calls", hidden: true });
    const state = h("span", { class: "writing" }, " (writing…)");
    const item = entry("reply", this.agent, null, text, calls);
    item.querySelector(".who").append(state);
    // the log announces a reply once it is whole, not word by word
    item.setAttribute("aria-busy", "true");
    d = { item, text, calls, state, pieces: new Map(), attempt, done: false };
    this.drafts.set(step, d);
    this.add(item);
    return d;
  }

  reset(d) {
    d.text.textContent = "";
    d.calls.replaceChildren();
    d.calls.hidden = true;
    d.pieces.clear();
  }

  event(e) {
    const handler = this[`on_${e.kind}`];
    if (handler) handler.call(this, e);
  }

  on_model_delta(e) {
    const d = this.draft(e.step, e.attempt, true);
    if (e.call_id === "" || e.call_id === undefined) {
      d.text.append(e.text ?? "");
      return;
    }
    let piece = d.pieces.get(e.call_id);
    if (!piece) {
      piece = { tool: "", args: "", node: h("li", {}) };
      d.pieces.set(e.call_id, piece);
      d.calls.append(piece.node);
      d.calls.hidden = false;
    }
    if (e.tool) piece.tool = e.tool;
    piece.args += e.arguments ?? "";
    piece.node.textContent = `Preparing ${piece.tool || "a tool call"}(${piece.args}`;
  }

  on_model_discard(e) {
    const d = this.drafts.get(e.step);
    if (!d || d.done) return;
    this.reset(d);
    d.state.textContent = e.detail ? ` (started again: ${e.detail})` : " (started again)";
  }

  on_model_reply(e) {
    const d = this.draft(e.step);
    this.reset(d);
    d.done = true;
    d.item.removeAttribute("aria-busy");
    const meta = [e.model, e.tokens ? `${e.tokens} tokens` : ""].filter(Boolean).join(", ");
    d.state.textContent = meta ? ` (${meta})` : "";
    d.item.querySelector("time")?.remove();
    d.item.querySelector(".who").append(h("time", { datetime: e.at }, when(e.at)));
    d.text.textContent = e.text || (e.detail ? "" : "(no text)");
    d.text.hidden = !d.text.textContent;
    if (e.detail) {
      d.calls.append(h("li", {}, `Calls ${e.detail}`));
      d.calls.hidden = false;
    }
    const cut = CUT.exec(e.text ?? "");
    if (cut) {
      const start = e.text.slice(0, cut.index);
      this.whole(e.step, start).then((text) => {
        if (text) d.text.textContent = text;
      });
    }
  }

  on_tool_started(e) {
    this.add(
      entry("tool", `Tool ${e.tool}`, e.at, h("p", {}, `Running ${e.tool}(${e.arguments})`)),
    );
  }

  on_tool_result(e) {
    this.add(entry("tool", `Tool ${e.tool}`, e.at, h("p", { class: "text" }, `Result: ${e.text}`)));
  }

  on_approval_requested(e) {
    const body = [
      h("p", {}, `${e.tool}(${e.arguments}) needs approval${e.detail ? `: ${e.detail}` : ""}.`),
    ];
    this.add(entry("approval", "Approval needed", e.at, ...body));
  }

  on_approval_decided(e) {
    const by = e.by ? ` by ${e.by}` : "";
    this.add(
      entry("approval", "Approval decided", e.at, h("p", {}, `${e.tool}: ${e.detail}${by}.`)),
    );
  }

  on_message(e) {
    this.add(
      entry(
        "user",
        e.by || "Message",
        e.at,
        h("p", { class: "text" }, e.text),
        e.detail ? h("p", { class: "hint" }, e.detail) : null,
      ),
    );
  }

  on_status(e) {
    if (e.status === this.lastStatus) return;
    this.lastStatus = e.status;
    const extra = e.text ? `: ${e.text}` : "";
    this.add(entry("status", "Status", e.at, h("p", {}, `${statusText(e.status)}${extra}`)));
  }

  on_ended(e) {
    for (const d of this.drafts.values()) {
      if (!d.done) d.item.removeAttribute("aria-busy");
    }
    const said = e.status === "completed" ? "" : e.text ? `: ${e.text}` : "";
    this.add(entry("ended", "Run ended", e.at, h("p", {}, `${statusText(e.status)}${said}`)));
  }
}
