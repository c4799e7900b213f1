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

/** The API's problem for a stream it refuses (answered before any event), or null. */
async function refusal(url) {
  const stop = new AbortController();
  try {
    const res = await fetch(url, { credentials: "same-origin", signal: stop.signal });
    if (res.ok) return null;
    const type = res.headers.get("Content-Type") ?? "";
    const data = type.includes("json") ? await res.json().catch(() => null) : null;
    return new ApiError(res.status, detailOf(data, res.status, res.statusText), data);
  } catch {
    return new ApiError(0, "The server cannot be reached.");
  } finally {
    stop.abort(); // a stream that opened after all is not wanted here
  }
}

/**
 * A live stream of named events that comes back after any break. EventSource resumes by
 * itself after a dropped connection (sending Last-Event-ID); when the server refuses the
 * stream instead (an error status closes it for good), the same address is asked once more
 * for the API's reason, which is shown, and the stream is opened again a little later from
 * the last event seen (never for a caller signed out or a run not to be seen).
 */
export class LiveStream {
  constructor(path, handlers, { onState = () => {}, resumable = false } = {}) {
    this.path = path;
    this.handlers = handlers;
    this.onState = onState;
    this.resumable = resumable;
    this.last = -1;
    this.wait = 1000;
    this.why = "";
    this.closed = false;
    this.open();
  }

  url() {
    const from = this.resumable && this.last >= 0 ? `?from=${this.last + 1}` : "";
    return `api/${this.path}${from}`;
  }

  open() {
    const source = new EventSource(this.url());
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
    source.onerror = (e) =>
      typeof e.data === "string" ? this.problem(e.data) : this.broken(source);
  }

  problem(data) {
    let problem = {};
    try {
      problem = JSON.parse(data);
    } catch {
      // said below in general words
    }
    this.stopOr(problem.status, problem.detail || problem.title || "the server stopped the stream");
  }

  /** Stop for good on a refusal that waiting cannot change; else say why, and go on. */
  stopOr(status, why) {
    this.why = why;
    if (status === 401 || status === 403 || status === 404) {
      this.onState("stopped", why);
      this.close();
      if (status === 401) signedOut(new ApiError(status, why));
      return false;
    }
    this.onState("reconnecting", why);
    return true;
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
      this.onState("reconnecting", this.why);
      return;
    }
    const refused = await refusal(this.url());
    if (this.closed) return;
    if (refused && !this.stopOr(refused.status, refused.message)) return;
    if (!refused) this.onState("reconnecting", this.why);
    this.timer = setTimeout(() => this.open(), this.wait);
    this.wait = Math.min(this.wait * 2, 30000);
  }

  close() {
    this.closed = true;
    clearTimeout(this.timer);
    this.source?.close();
  }
}
