// The page: sign in, then runs (live), a run's own page, and the approvals inbox, routed by
// the address's #fragment so links, the back button and reloads all work.

import { api, LiveStream, onSignedOut } from "./api.js";
import { ApprovalList } from "./approvals.js";
import { announce, fill, h, showError } from "./dom.js";
import { RunView } from "./run.js";
import { RunStore, RunsView } from "./runs.js";
import { count, seesText } from "./words.js";

/** Tells every view what the live streams bring: ("run", summary), ("inbox", approvals). */
class Bus {
  constructor() {
    this.listeners = new Set();
  }
  on(fn) {
    this.listeners.add(fn);
    return () => this.listeners.delete(fn);
  }
  emit(kind, data) {
    for (const fn of [...this.listeners]) fn(kind, data);
  }
}

class InboxView {
  constructor(root, bus, inbox) {
    this.heading = h("h2", { tabindex: "-1" }, "Approvals");
    const box = h("section", { "aria-label": "Open approvals" });
    fill(
      root,
      this.heading,
      h(
        "p",
        { class: "hint" },
        "Every tool call waiting for a decision you may see, oldest first.",
      ),
      box,
    );
    this.list = new ApprovalList(box, { emptyText: "Nothing waits for a decision." });
    if (inbox.latest) this.list.show(inbox.latest);
    this.list.refresh();
    this.off = bus.on((kind, data) => kind === "inbox" && this.list.show(data));
  }
  dispose() {
    this.off();
  }
}

const main = document.getElementById("main");
const who = document.getElementById("who");
const nav = document.getElementById("sections");
const inboxCount = document.getElementById("inbox-count");
const bus = new Bus();
const store = new RunStore(bus);
const inbox = { latest: null, timer: null };
let me = null;
let view = null;
let events = null;
let routed = false;

/** Fetch the open approvals: once for each burst of changes, however many it holds. */
function refreshInbox() {
  if (inbox.timer) return;
  inbox.timer = setTimeout(async () => {
    inbox.timer = null;
    try {
      inbox.latest = (await api("GET", "approvals")).approvals ?? [];
    } catch {
      return; // the views that list approvals show their own errors
    }
    setCount(inbox.latest.length);
    store.countApprovals(inbox.latest);
    bus.emit("inbox", inbox.latest);
  }, 300);
}

function setCount(n) {
  inboxCount.textContent = n ? ` (${n} open)` : "";
}

function signInView() {
  const error = h("p", { class: "error", role: "alert", hidden: true });
  const token = h("input", {
    id: "token",
    type: "password",
    autocomplete: "current-password",
    required: true,
  });
  const heading = h("h2", { tabindex: "-1" }, "Sign in");
  const form = h(
    "form",
    { class: "signin", novalidate: true },
    h(
      "div",
      { class: "field" },
      h("label", { for: "token" }, "Access token"),
      token,
      h("p", { class: "hint" }, "The token your administrator gave you (keel token new)."),
    ),
    h("div", { class: "actions" }, h("button", { type: "submit", class: "primary" }, "Sign in")),
    error,
  );
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    if (!token.value) {
      showError(error, "Enter your access token.");
      token.focus();
      return;
    }
    try {
      await api("POST", "session", { token: token.value });
      routed = true; // the person acted: focus goes to what they get
      await signedIn(await api("GET", "me"));
    } catch (e) {
      showError(error, e.message);
      token.select();
    }
  });
  return { heading, form };
}

function showSignIn(reason) {
  me = null;
  events?.close();
  events = null;
  view?.dispose?.();
  view = null;
  who.replaceChildren();
  nav.hidden = true;
  const { heading, form } = signInView();
  fill(main, heading, reason ? h("p", { class: "error", role: "alert" }, reason) : null, form);
  document.title = "Sign in · Keel";
  form.querySelector("input").focus();
}

async function signOut() {
  try {
    await api("DELETE", "session");
  } catch {
    // signed out here either way
  }
  store.runs.clear();
  showSignIn("");
  announce("Signed out.");
}

async function signedIn(user) {
  me = user;
  const roles = me.roles?.length ? me.roles.join(", ") : "no roles";
  const tenant = me.tenant ? `; tenant ${me.tenant}` : "";
  fill(
    who,
    h(
      "p",
      {},
      "Signed in as ",
      h("strong", {}, me.user),
      ` (${roles}${tenant}). Sees ${seesText(me)}.`,
    ),
    h("button", { type: "button", onclick: signOut }, "Sign out"),
  );
  nav.hidden = false;
  events = new LiveStream("events", {
    run: (run) => {
      bus.emit("run", run);
      refreshInbox();
    },
    approvals: (data) => {
      setCount(data.count ?? 0);
      refreshInbox();
    },
  });
  refreshInbox();
  route();
}

function route() {
  if (!me) return;
  const hash = decodeURIComponent(location.hash.replace(/^#\/?/, ""));
  view?.dispose?.();
  const root = h("div", {});
  fill(main, root);
  let current = "runs";
  if (hash.startsWith("runs/")) {
    const run = hash.slice(5);
    view = new RunView(root, run, bus);
    if (inbox.latest) view.approvals.show(inbox.latest);
    document.title = `Run ${run} · Keel`;
    current = "";
  } else if (hash === "approvals") {
    view = new InboxView(root, bus, inbox);
    document.title = "Approvals · Keel";
    current = "approvals";
  } else {
    view = new RunsView(root, store, bus);
    document.title = "Runs · Keel";
  }
  for (const link of nav.querySelectorAll("a")) {
    if (link.dataset.section === current) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  // a person who followed a link lands on the new view's heading, as on a page load
  if (routed) view.heading.focus();
  routed = true;
}

document.getElementById("skip").addEventListener("click", (ev) => {
  ev.preventDefault();
  main.focus();
});
window.addEventListener("hashchange", route);
onSignedOut((e) => showSignIn(e.message));

try {
  await signedIn(await api("GET", "me"));
} catch (e) {
  showSignIn(e.status === 401 ? "" : e.message);
}
