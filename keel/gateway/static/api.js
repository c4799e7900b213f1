// The page's only way to the API: JSON over fetch (the sign-in cookie goes along), errors as
// the API's problem+json `detail`, live updates over Server-Sent Events.

/** A refusal or failure, with the text to show a person. */
export class ApiError extends Error {
  constructor(status, detail, problem = null) {
    super(detail);
    this.status = status;
    this.problem = problem;
  }
}

let signedOut = () => {};

/** What to do when the API says the caller is not signed in (any call but signing in). */
export function onSignedOut(handler) {
  signedOut = handler;
}

/** The text of a problem's `detail` (a string; a list of field errors reads as lines). */
function detailOf(problem, status, statusText) {
  const detail = problem?.detail;
  if (typeof detail === "string" && detail) return detail;
  if (Array.isArray(detail)) {
    return detail
      .map((d) => {
        const where = Array.isArray(d.loc) ? d.loc.filter((p) => p !== "body").join(".") : "";
        return where ? `${where}: ${d.msg}` : String(d.msg ?? JSON.stringify(d));
      })
      .join("\n");
  }
  return problem?.title || `${status} ${statusText}`.trim();
}

/** Call the API: `path` is relative to `api/`; the answer's JSON, or null for 204. */
export async function api(method, path, body) {
  const init = {
    method,
    credentials: "same-origin",
    headers: { Accept: "application/json, application/problem+json" },
  };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let res;
  try {
    res = await fetch(`api/${path}`, init);
  } catch {
    throw new ApiError(0, "The server cannot be reached. Check the connection and try again.");
  }
  const type = res.headers.get("Content-Type") ?? "";
  const data = type.includes("json") ? await res.json().catch(() => null) : null;
  if (res.ok) return res.status === 204 ? null : data;
  let detail = detailOf(data, res.status, res.statusText);
  const retry = res.headers.get("Retry-After");
  if (res.status === 429 && retry) detail += ` (try again in ${retry} s)`;
  const error = new ApiError(res.status, detail, data);
  if (res.status === 401 && path !== "session") signedOut(error);
  throw error;
}

/**
 * A live stream of named events that comes back after any break. EventSource resumes by
 * itself after a dropped connection (sending Last-Event-ID); when the server refuses the
 * stream instead (an error status closes it for good), `probe` asks the API why, and the
 * stream is opened again a little later from the last event seen.
 */
export class LiveStream {
  constructor(path, handlers, { onState = () => {}, probe = null, resumable = false } = {}) {
    this.path = path;
    this.handlers = handlers;
    this.onState = onState;
    this.probe = probe;
    this.resumable = resumable;
    this.last = -1;
    this.wait = 1000;
    this.closed = false;
    this.open();
  }

  open() {
    const from = this.resumable && this.last >= 0 ? `?from=${this.last + 1}` : "";
    const source = new EventSource(`api/${this.path}${from}`);
    this.source = source;
    for (const kind of Object.keys(this.handlers)) {
      source.addEventListener(kind, (e) => this.deliver(kind, e));
    }
    source.onopen = () => {
      this.wait = 1000;
      this.why = "";
      this.onState("live", "");
    };
    // an `error` event from the server is a problem met once the stream was under way; a
    // plain error event is the connection's
    source.onerror = (e) => (typeof e.data === "string" ? this.problem(e.data) : this.broken(source));
  }

  problem(data) {
    let problem = {};
    try {
      problem = JSON.parse(data);
    } catch {
      // said below in general words
    }
    this.why = problem.detail || problem.title || "the server stopped the stream";
    if (problem.status === 401 || problem.status === 404) {
      this.onState("stopped", this.why);
      this.close();
      return;
    }
    this.onState("reconnecting", this.why);
  }

  deliver(kind, e) {
    if (this.closed) return;
    const offset = e.lastEventId === "" ? NaN : Number(e.lastEventId);
    if (this.resumable && !Number.isNaN(offset)) {
      if (offset <= this.last) return; // seen before a reconnect
      this.last = offset;
    }
    let data;
    try {
      data = JSON.parse(e.data);
    } catch {
      return;
    }
    this.handlers[kind](data, offset);
  }

  async broken(source) {
    if (this.closed || source !== this.source) return;
    if (source.readyState !== EventSource.CLOSED) {
      this.onState("reconnecting", this.why ?? "");
      return;
    }
    let why = this.why ?? "";
    if (this.probe) {
      try {
        await this.probe();
      } catch (e) {
        why = e.message;
        if (e.status === 401 || e.status === 404) {
          this.onState("stopped", why);
          this.close();
          return;
        }
      }
    }
    if (this.closed) return;
    this.onState("reconnecting", why);
    this.timer = setTimeout(() => this.open(), this.wait);
    this.wait = Math.min(this.wait * 2, 30000);
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.source?.close();
  }
}
