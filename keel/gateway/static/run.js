// One run's page: what it is, its conversation live, its open approvals, a message box with
// the four policies, cancel (and resume, when it waits on its model provider).

import { api, LiveStream } from "./api.js";
import { ApprovalList } from "./approvals.js";
import { announce, fill, h, showError } from "./dom.js";
import { MessageBox } from "./message.js";
import { Timeline } from "./timeline.js";
import { readTranscript, transcriptBox, wholeReply } from "./transcript.js";
import { ENDED, statusText } from "./words.js";

export class RunView {
  constructor(root, runId, bus) {
    this.runId = runId;
    this.path = `runs/${encodeURIComponent(runId)}`;
    this.bus = bus;
    this.ended = false;
    this.build(root);
    this.offBus = bus.on((kind, data) => {
      if (kind === "run" && data.run_id === runId) this.facts(data);
      if (kind === "inbox") this.approvals.show(data);
    });
    this.load();
  }

  build(root) {
    this.heading = h("h2", { tabindex: "-1" }, "Run ", h("code", {}, this.runId));
    this.status = h("p", { class: "run-status", role: "status", tabindex: "-1" }, "Loading…");
    this.error = h("p", { class: "error", role: "alert", hidden: true });
    this.factList = h("dl", { class: "facts" });
    this.liveState = h("p", { class: "live-state hint", role: "status" });
    this.cancelButton = h(
      "button",
      { type: "button", class: "danger", onclick: () => this.confirmCancel(true) },
      "Cancel run",
    );
    this.resumeButton = h(
      "button",
      { type: "button", hidden: true, onclick: () => this.resume() },
      "Try the model provider again",
    );
    this.confirm = h(
      "div",
      { class: "panel", hidden: true, role: "group", "aria-label": "Confirm cancelling" },
      h("p", {}, "Cancel this run? Work in flight stops; what it did stays on record."),
      h(
        "div",
        { class: "actions" },
        h(
          "button",
          { type: "button", class: "danger", onclick: () => this.cancel() },
          "Yes, cancel the run",
        ),
        h(
          "button",
          { type: "button", onclick: () => this.confirmCancel(false) },
          "Keep it running",
        ),
      ),
    );
    const approvalsBox = h(
      "section",
      { "aria-labelledby": "run-approvals-h" },
      h("h3", { id: "run-approvals-h" }, "Waiting for a decision"),
    );
    this.approvals = new ApprovalList(approvalsBox, {
      runId: this.runId,
      emptyText: "Nothing in this run waits for a decision.",
      onCount: (n) => this.facts({ pending: n }),
    });
    this.log = h("ol", {
      class: "timeline",
      role: "log",
      "aria-live": "polite",
      "aria-labelledby": "conversation-h",
    });
    this.timeline = new Timeline(this.log, {
      whole: (step, start) => wholeReply(this.path, start),
    });
    this.messages = new MessageBox(this.path, this.runId);
    // all of the run but its heading and what went wrong: hidden for a run not to be seen
    this.body = h(
      "div",
      {},
      h("div", { class: "actions" }, this.cancelButton, this.resumeButton),
      this.confirm,
      approvalsBox,
      h(
        "section",
        { "aria-labelledby": "conversation-h" },
        h("h3", { id: "conversation-h" }, "Conversation"),
        this.liveState,
        this.log,
      ),
      this.messages.form,
      transcriptBox(this.path),
    );
    fill(
      root,
      h("p", {}, h("a", { href: "#/runs" }, "All runs")),
      this.heading,
      this.status,
      this.factList,
      this.error,
      this.body,
    );
  }

  async load() {
    try {
      this.facts(await api("GET", this.path));
    } catch (e) {
      showError(this.error, e.message);
      if (e.status === 404 || e.status === 401) {
        this.status.textContent = "";
        this.body.hidden = true;
        return;
      }
    }
    this.approvals.refresh();
    this.opening();
    this.stream = new LiveStream(
      `${this.path}/events`,
      Object.fromEntries(
        [
          "model_delta",
          "model_discard",
          "model_reply",
          "tool_started",
          "tool_result",
          "approval_requested",
          "approval_decided",
          "message",
          "status",
          "ended",
        ].map((k) => [k, (e, offset) => this.event(e, offset)]),
      ),
      { resumable: true, onState: (state, why) => this.streamState(state, why) },
    );
  }

  /** The run's summary fields (from GET, or the runs stream). */
  facts(run) {
    this.run = { ...this.run, ...run };
    const r = this.run;
    const step = r.step ?? r.steps ?? 0;
    // the open approvals as the inbox lists them (live), else as the run's status said
    const pending =
      r.pending ??
      (Array.isArray(r.pending_approvals) ? r.pending_approvals.length : r.pending_approvals);
    // once the run's own events tell its status, they are newer than any listing
    if (!this.heard) this.setStatus(r.status, step);
    const rows = [
      ["Agent", r.agent],
      ["User", r.user],
      ["Tokens", r.usage?.total_tokens ?? r.tokens],
      ["Approvals pending", pending],
      ["Error", r.error],
    ].filter(([, v]) => v !== undefined && v !== null && v !== "");
    fill(
      this.factList,
      rows.map(([k, v]) => [h("dt", {}, k), h("dd", {}, String(v))]),
    );
    if (r.agent) this.timeline.agent = r.agent;
  }

  setStatus(status, step) {
    if (!status) return;
    this.current = { status, step: Math.max(step ?? 0, this.current?.step ?? 0) };
    this.status.textContent = `Status: ${statusText(status)}, step ${this.current.step}`;
    this.ended = ENDED.has(status);
    this.cancelButton.hidden = this.ended;
    this.resumeButton.hidden = status !== "waiting_provider";
    if (this.ended) this.confirm.hidden = true;
    this.messages.setEnded(this.ended);
  }

  async opening() {
    try {
      const first = (await readTranscript(this.path, { all: false })).find(
        (m) => m.role === "user",
      );
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
    if (e.kind === "status") {
      this.heard = true;
      this.setStatus(e.status, e.step);
    } else if (e.step && this.current) {
      this.setStatus(this.current.status, e.step);
    }
    if (e.kind === "approval_requested" || e.kind === "approval_decided") this.approvals.refresh();
    if (e.kind === "ended") {
      this.heard = true;
      this.setStatus(e.status, e.step);
      this.stream.close();
      this.liveState.textContent = "The run has ended.";
      announce(`The run ended: ${statusText(e.status)}.`);
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
      this.status.focus(); // where the run's end will show
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

  dispose() {
    this.stream?.close();
    this.offBus();
  }
}
