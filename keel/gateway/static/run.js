// One run's page: what it is, its conversation live, its open approvals, a message box with
// the four policies, cancel (and resume, when it waits on its model provider).

import { api, LiveStream } from "./api.js";
import { ApprovalList } from "./approvals.js";
import { announce, clientId, fill, h, showError, uid } from "./dom.js";
import { Timeline } from "./timeline.js";
import { ENDED, POLICIES, statusText } from "./words.js";

export class RunView {
  constructor(root, runId, bus) {
    this.runId = runId;
    this.path = `runs/${encodeURIComponent(runId)}`;
    this.bus = bus;
    this.ended = false;
    this.transcript = null;
    this.build(root);
    this.offBus = bus.on((kind, data) => {
      if (kind === "run" && data.run_id === runId) this.facts(data);
      if (kind === "inbox") this.approvals.show(data);
    });
    this.load();
  }

  build(root) {
    this.heading = h("h2", { tabindex: "-1" }, "Run ", h("code", {}, this.runId));
    this.status = h("p", { class: "run-status", role: "status" }, "Loading…");
    this.error = h("p", { class: "error", role: "alert", hidden: true });
    this.factList = h("dl", { class: "facts" });
    this.liveState = h("p", { class: "live-state hint", role: "status" });
    this.cancelButton = h("button", { type: "button", class: "danger", onclick: () => this.confirmCancel(true) }, "Cancel run");
    this.resumeButton = h("button", { type: "button", hidden: true, onclick: () => this.resume() }, "Try the model provider again");
    this.confirm = h(
      "div",
      { class: "panel", hidden: true, role: "group", "aria-label": "Confirm cancelling" },
      h("p", {}, "Cancel this run? Work in flight stops; what it did stays on record."),
      h("div", { class: "actions" }, h("button", { type: "button", class: "danger", onclick: () => this.cancel() }, "Yes, cancel the run"), h("button", { type: "button", onclick: () => this.confirmCancel(false) }, "Keep it running")),
    );
    const approvalsBox = h("section", { "aria-labelledby": "run-approvals-h" }, h("h3", { id: "run-approvals-h" }, "Waiting for a decision"));
    this.approvals = new ApprovalList(approvalsBox, { runId: this.runId, emptyText: "Nothing in this run waits for a decision." });
    this.log = h("ol", { class: "timeline", role: "log", "aria-live": "polite", "aria-labelledby": "conversation-h" });
    this.timeline = new Timeline(this.log, { whole: (step, start) => this.wholeReply(start) });
    this.transcriptBox = h("details", { class: "transcript" }, h("summary", {}, "Whole transcript"), h("p", { class: "hint" }, "Loading…"));
    this.transcriptBox.addEventListener("toggle", () => this.transcriptBox.open && this.showTranscript());
    fill(
      root,
      h("p", {}, h("a", { href: "#/runs" }, "All runs")),
      this.heading,
      this.status,
      this.factList,
      this.error,
      h("div", { class: "actions" }, this.cancelButton, this.resumeButton),
      this.confirm,
      approvalsBox,
      h("section", { "aria-labelledby": "conversation-h" }, h("h3", { id: "conversation-h" }, "Conversation"), this.liveState, this.log),
      this.messageForm(),
      this.transcriptBox,
    );
  }

  async load() {
    try {
      this.facts(await api("GET", this.path));
    } catch (e) {
      showError(this.error, e.message);
      if (e.status === 404 || e.status === 401) {
        this.status.textContent = "";
        this.stopped = true;
        this.liveState.textContent = "";
        return;
      }
    }
    this.approvals.refresh();
    this.opening();
    this.stream = new LiveStream(
      `${this.path}/events`,
      Object.fromEntries(
        ["model_delta", "model_discard", "model_reply", "tool_started", "tool_result", "approval_requested", "approval_decided", "message", "status", "ended"].map((k) => [k, (e, offset) => this.event(e, offset)]),
      ),
      { resumable: true, onState: (state, why) => this.streamState(state, why) },
    );
  }

  /** The run's summary fields (from GET, or the runs stream). */
  facts(run) {
    this.run = { ...this.run, ...run };
    const r = this.run;
    const step = r.step ?? r.steps ?? 0;
    const pending = Array.isArray(r.pending_approvals) ? r.pending_approvals.length : r.pending_approvals;
    this.setStatus(r.status, step);
    const rows = [
      ["Agent", r.agent],
      ["User", r.user],
      ["Tokens", r.usage?.total_tokens ?? r.tokens],
      ["Approvals pending", pending],
      ["Error", r.error],
    ].filter(([, v]) => v !== undefined && v !== null && v !== "");
    fill(this.factList, rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]));
    if (r.agent) this.timeline.agent = r.agent;
  }

  setStatus(status, step) {
    if (!status) return;
    this.current = { status, step: step ?? this.current?.step ?? 0 };
    this.status.textContent = `Status: ${statusText(status)}, step ${this.current.step}`;
    this.ended = ENDED.has(status);
    this.cancelButton.hidden = this.ended;
    this.resumeButton.hidden = status !== "waiting_provider";
    if (this.ended) this.confirm.hidden = true;
    this.sendButton.disabled = this.ended;
    this.closedNote.hidden = !this.ended;
  }

  async opening() {
    try {
      const slice = await api("GET", `${this.path}/transcript?start=0`);
      const first = (slice.messages ?? []).find((m) => m.role === "user");
      if (first) this.timeline.opening(this.run?.user, first.content ?? "");
    } catch {
      // the conversation still shows from the events; the transcript says why when opened
    }
  }

  event(e, offset) {
    if (this.firstOffset === undefined) {
      this.firstOffset = offset;
      if (offset > 0) this.timeline.gap();
    }
    this.timeline.event(e);
    if (e.kind === "status") this.setStatus(e.status, e.step);
    else if (e.step && this.current) this.setStatus(this.current.status, Math.max(e.step, this.current.step));
    if (e.kind === "approval_requested" || e.kind === "approval_decided") this.approvals.refresh();
    if (e.kind === "ended") {
      this.setStatus(e.status, e.step);
      this.stream.close();
      this.liveState.textContent = "The run has ended.";
      announce(`The run ended: ${statusText(e.status)}.`);
      this.transcript = null;
    }
  }

  streamState(state, why) {
    if (this.ended) return;
    const text = {
      live: "Live: updates appear as they happen.",
      reconnecting: `Reconnecting to live updates…${why ? ` ${why}` : ""}`,
      stopped: `Live updates stopped: ${why}`,
    }[state];
    this.liveState.textContent = text;
  }

  confirmCancel(open) {
    this.confirm.hidden = !open;
    if (open) this.confirm.querySelector("button").focus();
    else this.cancelButton.focus();
  }

  async cancel() {
    showError(this.error, "");
    try {
      await api("POST", `${this.path}/cancel`);
      this.confirm.hidden = true;
      this.status.focus?.();
      announce("Cancelling the run.");
      this.liveState.textContent = "Cancelling the run…";
    } catch (e) {
      showError(this.error, e.message);
    }
  }

  async resume() {
    showError(this.error, "");
    try {
      await api("POST", `${this.path}/resume`);
      announce("The run will try its model provider again.");
    } catch (e) {
      showError(this.error, e.message);
    }
  }

  messageForm() {
    const textId = uid("message");
    const text = h("textarea", { id: textId, rows: 3, required: true });
    const choices = [["", "Agent's default", "the policy the agent is set up with"], ...POLICIES].map(([value, name, what]) => {
      const id = uid("policy");
      return h("div", { class: "choice" }, h("input", { type: "radio", name: `policy-${this.runId}`, id, value, checked: value === "" }), h("label", { for: id }, h("strong", {}, name), ` — ${what}`));
    });
    const receipt = h("p", { class: "outcome", role: "status" });
    const error = h("p", { class: "error", role: "alert", hidden: true });
    this.sendButton = h("button", { type: "submit", class: "primary" }, "Send message");
    this.closedNote = h("p", { class: "hint", hidden: true }, "This run has ended: it takes no more messages.");
    let id = clientId();
    const form = h(
      "form",
      { class: "message", novalidate: true, "aria-labelledby": "message-h" },
      h("h3", { id: "message-h" }, "Send a message"),
      h("label", { for: textId }, "Message"),
      text,
      h("fieldset", {}, h("legend", {}, "If the agent is busy"), choices),
      this.closedNote,
      h("div", { class: "actions" }, this.sendButton),
      error,
      receipt,
    );
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      showError(error, "");
      receipt.textContent = "";
      if (!text.value.trim()) {
        showError(error, "Write a message first.");
        text.setAttribute("aria-invalid", "true");
        text.focus();
        return;
      }
      text.removeAttribute("aria-invalid");
      const policy = form.querySelector("input[type=radio]:checked")?.value || null;
      this.sendButton.disabled = true;
      try {
        const r = await api("POST", `${this.path}/messages`, { text: text.value, policy, id });
        id = clientId();
        if (r.status === "rejected") {
          showError(error, r.reason || "The run refused the message.");
          return;
        }
        const said = { queued: "Message queued", delivered: "Message delivered", duplicate: "This message was sent before; the run has it once" }[r.status] ?? `Message ${r.status}`;
        receipt.textContent = `${said} (${r.policy}).${r.reason ? ` ${r.reason}` : ""}`;
        text.value = "";
      } catch (e) {
        // lost on the way or refused for now: the same id again is delivered at most once
        if (e.status >= 400 && e.status < 500 && e.status !== 429) id = clientId();
        showError(error, e.message);
      } finally {
        this.sendButton.disabled = this.ended;
      }
    });
    return form;
  }

  async loadTranscript() {
    if (this.transcript) return this.transcript;
    const messages = [];
    let start = 0;
    for (let page = 0; page < 100; page += 1) {
      const slice = await api("GET", `${this.path}/transcript?start=${start}`);
      messages.push(...(slice.messages ?? []));
      start = (slice.start ?? start) + (slice.messages ?? []).length;
      if (!slice.messages?.length || start >= (slice.total ?? 0)) break;
    }
    this.transcript = messages;
    return messages;
  }

  async wholeReply(start) {
    try {
      this.transcript = null;
      const found = (await this.loadTranscript()).find((m) => m.role === "assistant" && (m.content ?? "").startsWith(start));
      return found?.content ?? null;
    } catch {
      return null;
    }
  }

  async showTranscript() {
    const box = this.transcriptBox;
    const body = box.querySelector("summary").nextElementSibling;
    try {
      this.transcript = null;
      const messages = await this.loadTranscript();
      const items = messages.map((m) => {
        const who = m.role === "tool" ? `tool ${m.name ?? ""}`.trim() : m.role;
        const calls = (m.tool_calls ?? []).map((c) => h("li", {}, `${c.name}(${c.arguments})`));
        return h("li", { class: `entry ${m.role}` }, h("p", { class: "who" }, who), m.content ? h("p", { class: "text" }, m.content) : null, calls.length ? h("ul", { class: "calls" }, calls) : null);
      });
      body.replaceWith(h("ol", { class: "timeline", "aria-label": "Whole transcript" }, items));
    } catch (e) {
      body.replaceWith(h("p", { class: "error", role: "alert" }, e.message));
    }
  }

  dispose() {
    this.stream?.close();
    this.offBus();
  }
}
