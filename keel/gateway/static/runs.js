// The runs the caller may see, kept live from the API's stream, and a form to start one.

import { api } from "./api.js";
import { fill, h, showError, uid, when } from "./dom.js";
import { count, statusText } from "./words.js";

/** Every run seen, by id (fed by GET /api/runs and the `run` events of /api/events). */
export class RunStore {
  constructor(bus) {
    this.runs = new Map();
    this.waiting = new Map(); // run id → open approvals, from the inbox
    bus.on((kind, data) => {
      if (kind === "run") this.runs.set(data.run_id, { ...this.runs.get(data.run_id), ...data });
    });
  }

  async load() {
    const { runs } = await api("GET", "runs?limit=50");
    for (const r of runs ?? []) this.runs.set(r.run_id, { ...this.runs.get(r.run_id), ...r });
  }

  /** Open approvals per run, as the inbox last listed them. */
  countApprovals(approvals) {
    this.waiting = new Map();
    for (const a of approvals) this.waiting.set(a.run_id, (this.waiting.get(a.run_id) ?? 0) + 1);
  }

  pendingOf(run) {
    const p = run.pending_approvals;
    if (Array.isArray(p)) return p.length;
    if (typeof p === "number") return p;
    return this.waiting.get(run.run_id) ?? 0;
  }

  sorted() {
    return [...this.runs.values()].sort((a, b) =>
      String(b.started ?? "").localeCompare(String(a.started ?? "")),
    );
  }
}

export class RunsView {
  constructor(root, store, bus) {
    this.store = store;
    this.items = new Map();
    this.heading = h("h2", { tabindex: "-1" }, "Runs");
    this.list = h("ul", { class: "cards runs", "aria-labelledby": "runs-h" });
    this.empty = h("p", { class: "hint" }, "Loading…");
    this.error = h("p", { class: "error", role: "alert", hidden: true });
    fill(
      root,
      this.heading,
      this.startForm(),
      h(
        "section",
        { "aria-labelledby": "runs-h" },
        h("h3", { id: "runs-h" }, "Runs you can see"),
        this.error,
        this.empty,
        this.list,
      ),
    );
    this.offBus = bus.on((kind) => {
      if (kind === "run" || kind === "inbox") this.render();
    });
    this.load();
  }

  async load() {
    try {
      await this.store.load();
      showError(this.error, "");
    } catch (e) {
      showError(this.error, e.message);
    }
    this.render();
  }

  render() {
    // items are updated in place, so a focused link keeps its focus as runs change
    const runs = this.store.sorted();
    runs.forEach((r, i) => {
      let item = this.items.get(r.run_id);
      if (!item) {
        item = this.item(r);
        this.items.set(r.run_id, item);
        this.list.insertBefore(item.node, this.list.children[i] ?? null);
      }
      item.update(r);
    });
    this.empty.hidden = runs.length > 0;
    this.empty.textContent = "No runs yet. Start one above.";
  }

  item(r) {
    const name = h("strong", {});
    const facts = h("p", { class: "facts-line" });
    const error = h("p", { class: "hint", hidden: true });
    const node = h(
      "li",
      { class: "card run" },
      h(
        "a",
        { href: `#/runs/${encodeURIComponent(r.run_id)}` },
        name,
        " ",
        h("code", {}, r.run_id),
      ),
      facts,
      error,
    );
    const update = (run) => {
      const pending = this.store.pendingOf(run);
      const parts = [
        h("span", { class: `badge status-${run.status || "unknown"}` }, statusText(run.status)),
        run.user ? h("span", {}, `user ${run.user}`) : null,
        h("span", {}, `step ${run.step ?? run.steps ?? 0}`),
        pending
          ? h("span", { class: "badge attention" }, `${count(pending, "approval")} pending`)
          : null,
        run.started ? h("span", { class: "hint" }, `started ${when(run.started)}`) : null,
      ].filter(Boolean);
      name.textContent = run.agent || "run";
      fill(
        facts,
        parts.flatMap((f, i) => (i ? [" · ", f] : [f])),
      );
      error.textContent = run.error ?? "";
      error.hidden = !run.error;
    };
    return { node, update };
  }

  startForm() {
    const agentId = uid("agent");
    const messageId = uid("first-message");
    const agent = h("input", {
      id: agentId,
      name: "agent",
      required: true,
      autocomplete: "off",
      list: "agents-seen",
    });
    const message = h("textarea", { id: messageId, name: "message", rows: 2, required: true });
    const agents = h("datalist", { id: "agents-seen" });
    const error = h("p", { class: "error", role: "alert", hidden: true });
    const button = h("button", { type: "submit", class: "primary" }, "Start run");
    const form = h(
      "form",
      { class: "start", novalidate: true, "aria-labelledby": "start-h" },
      h("h3", { id: "start-h" }, "Start a run"),
      h("div", { class: "field" }, h("label", { for: agentId }, "Agent"), agent, agents),
      h("div", { class: "field" }, h("label", { for: messageId }, "First message"), message),
      h("div", { class: "actions" }, button),
      error,
    );
    agent.addEventListener("focus", () => {
      const names = new Set([...this.store.runs.values()].map((r) => r.agent).filter(Boolean));
      fill(
        agents,
        [...names].sort().map((n) => h("option", { value: n })),
      );
    });
    form.addEventListener("submit", async (ev) => {
      ev.preventDefault();
      showError(error, "");
      for (const [control, what] of [
        [agent, "Name the agent to run."],
        [message, "Write the first message."],
      ]) {
        if (!control.value.trim()) {
          showError(error, what);
          control.setAttribute("aria-invalid", "true");
          control.focus();
          return;
        }
        control.removeAttribute("aria-invalid");
      }
      button.disabled = true;
      try {
        const { run_id: run } = await api("POST", "runs", {
          agent: agent.value.trim(),
          message: message.value,
        });
        this.store.runs.set(run, {
          run_id: run,
          agent: agent.value.trim(),
          status: "running",
          ...this.store.runs.get(run),
        });
        location.hash = `#/runs/${encodeURIComponent(run)}`;
      } catch (e) {
        showError(error, e.message);
      } finally {
        button.disabled = false;
      }
    });
    return form;
  }

  dispose() {
    this.offBus();
  }
}
