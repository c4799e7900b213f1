// Open approvals: one card per tool call waiting for a person, with its arguments, to
// approve, reject with a reason, or edit in a form made from the tool's schema. The inbox
// lists every card the caller may see; a run's page lists its own.

import { api } from "./api.js";
import { fill, h, showError, uid, when } from "./dom.js";
import { schemaFields } from "./schema-form.js";

const key = (a) => `${a.run_id}/${a.call_id}`;

/** One approval's card. `onDecided(text)` hears what became of it. */
function approvalCard(a, { showRun, onDecided }) {
  const headingId = uid("approval");
  // what became of it is said once, by the list's status line; the card only notes it
  const outcome = h("p", { class: "hint", hidden: true }, "Decided.");
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const title = showRun
    ? [
        h("span", {}, `${a.tool || "approval"} on run `),
        h("a", { href: `#/runs/${encodeURIComponent(a.run_id)}` }, a.run_id),
      ]
    : `${a.tool || "approval"}`;
  const card = h(
    "article",
    { class: "card approval", "aria-labelledby": headingId },
    h("h3", { id: headingId }, title),
  );
  if (a.reason) card.append(h("p", { class: "reason" }, a.reason));
  const args = Object.entries(a.arguments ?? {});
  if (args.length) {
    card.append(
      h("h4", { class: "small" }, "Arguments"),
      h(
        "dl",
        { class: "args" },
        args.map(([k, v]) => [
          h("dt", {}, k),
          h("dd", {}, typeof v === "string" ? v : JSON.stringify(v)),
        ]),
      ),
    );
  } else if (a.call_id) {
    card.append(h("p", { class: "hint" }, "No arguments."));
  }
  const facts = [];
  if (a.approvers?.length) facts.push(`May decide: ${a.approvers.join(", ")}.`);
  if (a.expires_at) facts.push(`Expires ${when(a.expires_at)}.`);
  if (facts.length) card.append(h("p", { class: "hint" }, facts.join(" ")));
  if (!a.call_id) {
    // an approval the API could not read (no worker serves its run): nothing to decide yet
    card.append(error, outcome);
    return card;
  }

  const describe = { "aria-describedby": headingId };
  const approve = h("button", { type: "button", class: "primary", ...describe }, "Approve");
  const rejectToggle = h(
    "button",
    { type: "button", "aria-expanded": "false", ...describe },
    "Reject…",
  );
  const editToggle = h(
    "button",
    { type: "button", "aria-expanded": "false", ...describe },
    "Edit…",
  );
  const actions = h("div", { class: "actions" }, approve, rejectToggle, editToggle);

  const reasonId = uid("reason");
  const reason = h("textarea", { id: reasonId, rows: 2, required: true });
  const rejectForm = h(
    "form",
    { class: "panel", hidden: true, id: uid("reject"), novalidate: true },
    h("label", { for: reasonId }, "Reason for rejecting (the agent reads it)"),
    reason,
    h(
      "div",
      { class: "actions" },
      h("button", { type: "submit", class: "danger" }, "Reject"),
      h(
        "button",
        { type: "button", onclick: () => toggle(rejectForm, rejectToggle, false) },
        "Cancel",
      ),
    ),
  );
  rejectToggle.setAttribute("aria-controls", rejectForm.id);

  let fields = null;
  const editFormError = h("p", { class: "error", role: "alert", hidden: true });
  const editForm = h("form", { class: "panel", hidden: true, id: uid("edit"), novalidate: true });
  editToggle.setAttribute("aria-controls", editForm.id);
  const buildEdit = () => {
    fields = schemaFields(a.parameters ?? {}, a.arguments ?? {});
    fill(
      editForm,
      h("fieldset", {}, h("legend", {}, `Arguments for ${a.tool}`), fields.element),
      editFormError,
      h(
        "div",
        { class: "actions" },
        h("button", { type: "submit", class: "primary" }, "Approve with these arguments"),
        h(
          "button",
          { type: "button", onclick: () => toggle(editForm, editToggle, false) },
          "Cancel",
        ),
      ),
    );
  };

  const toggle = (panel, button, open) => {
    panel.hidden = !open;
    button.setAttribute("aria-expanded", String(open));
    if (open) {
      if (panel === editForm) buildEdit();
      panel.querySelector("textarea, input, select")?.focus();
    } else {
      button.focus();
    }
  };
  rejectToggle.addEventListener("click", () => toggle(rejectForm, rejectToggle, rejectForm.hidden));
  editToggle.addEventListener("click", () => toggle(editForm, editToggle, editForm.hidden));

  const buttons = () => card.querySelectorAll("button");
  const decide = async (body, region, words, how = "") => {
    showError(error, "");
    showError(editFormError, "");
    buttons().forEach((b) => (b.disabled = true));
    try {
      const receipt = await api(
        "POST",
        `runs/${encodeURIComponent(a.run_id)}/approvals/${encodeURIComponent(a.call_id)}`,
        body,
      );
      const note = receipt?.note ? ` ${receipt.note}` : "";
      const text = `${words} ${a.tool} on run ${a.run_id}${how}.${note}`;
      outcome.hidden = false;
      rejectForm.hidden = editForm.hidden = true;
      actions.hidden = true;
      card.dataset.decided = "true";
      onDecided(text);
    } catch (e) {
      buttons().forEach((b) => (b.disabled = false));
      showError(region, e.message);
      (region === error ? approve : editForm.querySelector("button[type=submit]"))?.focus();
    }
  };
  approve.addEventListener("click", () =>
    decide({ decision: "approve", reason: "" }, error, "Approved"),
  );
  rejectForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    if (!reason.value.trim()) {
      showError(error, "Say why it is rejected: the agent reads the reason.");
      reason.setAttribute("aria-invalid", "true");
      reason.focus();
      return;
    }
    reason.removeAttribute("aria-invalid");
    decide({ decision: "reject", reason: reason.value.trim() }, error, "Rejected");
  });
  editForm.addEventListener("submit", (ev) => {
    ev.preventDefault();
    const args = fields?.read();
    if (!args) return;
    decide(
      { decision: "edit", reason: "", arguments: args },
      editFormError,
      "Approved",
      " with edited arguments",
    );
  });

  card.append(actions, rejectForm, editForm, error, outcome);
  return card;
}

/**
 * A list of approval cards kept in step with the API: cards stay while their approval is
 * open (so a half-filled form survives a refresh), new ones are added, decided ones go.
 */
export class ApprovalList {
  constructor(container, { runId = null, emptyText, onCount = () => {} }) {
    this.runId = runId;
    this.onCount = onCount;
    this.emptyText = emptyText;
    this.cards = new Map();
    this.list = h("ul", { class: "cards" });
    this.empty = h("p", { class: "hint" }, "Loading…");
    this.status = h("p", { role: "status", class: "outcome", tabindex: "-1" });
    this.error = h("p", { class: "error", role: "alert", hidden: true });
    container.append(this.status, this.error, this.empty, this.list);
  }

  async refresh() {
    let approvals;
    try {
      approvals = (await api("GET", "approvals")).approvals ?? [];
      showError(this.error, "");
    } catch (e) {
      showError(this.error, e.message);
      return null;
    }
    this.show(approvals);
    return approvals;
  }

  show(approvals) {
    const mine = approvals.filter((a) => !this.runId || a.run_id === this.runId);
    const open = new Set(mine.map(key));
    for (const [k, item] of this.cards) {
      if (open.has(k)) continue;
      const hadFocus = item.contains(document.activeElement);
      item.remove();
      this.cards.delete(k);
      if (hadFocus) this.status.focus();
    }
    for (const a of mine) {
      const k = key(a);
      if (this.cards.has(k)) continue;
      const card = approvalCard(a, {
        showRun: !this.runId,
        onDecided: (text) => {
          this.status.textContent = text;
        },
      });
      const item = h("li", {}, card);
      this.cards.set(k, item);
      this.list.append(item);
    }
    this.empty.textContent = this.cards.size ? "" : this.emptyText;
    this.empty.hidden = this.cards.size > 0;
    this.onCount(this.cards.size);
  }
}
