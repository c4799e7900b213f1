// How the page says what the API's codes mean.

const STATUS = {
  running: "running",
  waiting_approval: "waiting for approval",
  waiting_provider: "waiting for the model provider",
  idle: "idle, waiting for a message",
  completed: "completed",
  failed: "failed",
  cancelled: "cancelled",
  budget_exhausted: "budget spent",
};

export const ENDED = new Set(["completed", "failed", "cancelled", "budget_exhausted"]);

/** A run's status in words. */
export function statusText(status) {
  return STATUS[status] ?? (status || "unknown");
}

/** The four message policies, as the message box offers them. */
export const POLICIES = [
  ["queue", "Queue", "delivered at the next step, in order"],
  ["interrupt", "Interrupt", "stops the step in flight, then delivered"],
  ["rollback", "Rollback", "drops the current turn, as if this had been sent instead"],
  ["reject", "Reject", "refused while a turn is in flight"],
];

const SEES = { own: "their own runs", tenant: "runs of their tenant", all: "all runs" };

/** What the caller may see, in words. */
export function seesText(me) {
  const what = SEES[me.sees] ?? me.sees;
  return me.sees === "tenant" && me.tenant ? `runs of tenant ${me.tenant}` : what;
}

/** A count with its noun ("1 approval", "3 approvals"). */
export function count(n, noun) {
  return `${n} ${noun}${n === 1 ? "" : "s"}`;
}

/** Tool arguments in one line: `amount: 30, note: "test"`. */
export function argsText(args) {
  if (args === null || typeof args !== "object") return String(args ?? "");
  return Object.entries(args)
    .map(([k, v]) => `${k}: ${JSON.stringify(v)}`)
    .join(", ");
}
