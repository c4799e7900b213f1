// A run's message box: the text, one of the four policies (or the agent's own), and an id
// made here, so a message sent again after a lost answer is delivered once.

import { api } from "./api.js";
import { clientId, h, showError, uid } from "./dom.js";
import { POLICIES } from "./words.js";

const SAID = {
  queued: "Message queued",
  delivered: "Message delivered",
  duplicate: "This message was sent before; the run has it once",
};

export class MessageBox {
  constructor(path, runId) {
    this.path = path;
    this.id = clientId();
    const textId = uid("message");
    this.text = h("textarea", { id: textId, rows: 3, required: true });
    const choices = [["", "Agent's default", "the policy the agent is set up with"], ...POLICIES];
    const radios = choices.map(([value, name, what]) => {
      const id = uid("policy");
      return h(
        "div",
        { class: "choice" },
        h("input", { type: "radio", name: `policy-${runId}`, id, value, checked: value === "" }),
        h("label", { for: id }, h("strong", {}, name), ` — ${what}`),
      );
    });
    this.receipt = h("p", { class: "outcome", role: "status" });
    this.error = h("p", { class: "error", role: "alert", hidden: true });
    this.button = h("button", { type: "submit", class: "primary" }, "Send message");
    this.closed = h(
      "p",
      { class: "hint", hidden: true },
      "This run has ended: it takes no more messages.",
    );
    this.form = h(
      "form",
      { class: "message", novalidate: true, "aria-labelledby": "message-h" },
      h("h3", { id: "message-h" }, "Send a message"),
      h("label", { for: textId }, "Message"),
      this.text,
      h("fieldset", {}, h("legend", {}, "If the agent is busy"), radios),
      this.closed,
      h("div", { class: "actions" }, this.button),
      this.error,
      this.receipt,
    );
    this.form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.send();
    });
  }

  /** A run that has ended takes no more messages. */
  setEnded(ended) {
    this.ended = ended;
    this.button.disabled = ended;
    this.closed.hidden = !ended;
  }

  async send() {
    showError(this.error, "");
    this.receipt.textContent = "";
    const text = this.text;
    if (!text.value.trim()) {
      showError(this.error, "Write a message first.");
      text.setAttribute("aria-invalid", "true");
      text.focus();
      return;
    }
    text.removeAttribute("aria-invalid");
    const policy = this.form.querySelector("input[type=radio]:checked")?.value || null;
    this.button.disabled = true;
    try {
      const body = { text: text.value, policy, id: this.id };
      const r = await api("POST", `${this.path}/messages`, body);
      this.id = clientId();
      if (r.status === "rejected") {
        showError(this.error, r.reason || "The run refused the message.");
        return;
      }
      const said = SAID[r.status] ?? `Message ${r.status}`;
      this.receipt.textContent = `${said} (${r.policy}).${r.reason ? ` ${r.reason}` : ""}`;
      text.value = "";
    } catch (e) {
      // lost on the way, or refused for now: the same id again is delivered at most once
      if (e.status >= 400 && e.status < 500 && e.status !== 429) this.id = clientId();
      showError(this.error, e.message);
    } finally {
      this.button.disabled = Boolean(this.ended);
    }
  }
}
