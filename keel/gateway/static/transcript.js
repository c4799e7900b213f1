// A run's whole transcript (events carry only the start of a long text).

import { api } from "./api.js";
import { h } from "./dom.js";

/** Every message of the run's transcript (page by page), or only the first page. */
export async function readTranscript(path, { all = true } = {}) {
  const messages = [];
  let start = 0;
  for (let page = 0; page < 100; page += 1) {
    const slice = await api("GET", `${path}/transcript?start=${start}`);
    const got = slice.messages ?? [];
    messages.push(...got);
    start = (slice.start ?? start) + got.length;
    if (!all || !got.length || start >= (slice.total ?? 0)) break;
  }
  return messages;
}

/** The whole text of a reply an event gave only the start of (null when not found). */
export async function wholeReply(path, start) {
  try {
    const messages = await readTranscript(path);
    const found = messages.find(
      (m) => m.role === "assistant" && (m.content ?? "").startsWith(start),
    );
    return found?.content ?? null;
  } catch {
    return null;
  }
}

/** A disclosure that reads the transcript afresh each time it is opened. */
export function transcriptBox(path) {
  let body = h("p", { class: "hint" }, "Loading…");
  const box = h("details", { class: "transcript" }, h("summary", {}, "Whole transcript"), body);
  box.addEventListener("toggle", async () => {
    if (!box.open) return;
    let shown;
    try {
      const items = (await readTranscript(path)).map((m) => {
        const who = m.role === "tool" ? `tool ${m.name ?? ""}`.trim() : m.role;
        const calls = (m.tool_calls ?? []).map((c) => h("li", {}, `${c.name}(${c.arguments})`));
        return h(
          "li",
          { class: `entry ${m.role}` },
          h("p", { class: "who" }, who),
          m.content ? h("p", { class: "text" }, m.content) : null,
          calls.length ? h("ul", { class: "calls" }, calls) : null,
        );
      });
      shown = h("ol", { class: "timeline", "aria-label": "Whole transcript" }, items);
    } catch (e) {
      shown = h("p", { class: "error", role: "alert" }, e.message);
    }
    body.replaceWith(shown);
    body = shown;
  });
  return box;
}
