// Building the page's elements: every text goes in as text (never as HTML), so nothing a
// run or a person wrote can become markup.

let counter = 0;

/** A fresh id for pairing labels, hints and errors with their controls. */
export function uid(prefix) {
  counter += 1;
  return `${prefix}-${counter}`;
}

/**
 * An element: attributes by name (`true` sets a boolean attribute, null/false/undefined
 * skip it), listeners as `on<event>`, properties as `.<name>`; children are nodes or text.
 */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on")) el.addEventListener(key.slice(2), value);
    else if (key.startsWith(".")) el[key.slice(1)] = value;
    else el.setAttribute(key, value === true ? "" : String(value));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children) {
    if (child === null || child === undefined || child === false) continue;
    if (Array.isArray(child)) append(el, child);
    else el.append(child);
  }
}

/** Replace an element's children. */
export function fill(el, ...children) {
  el.replaceChildren();
  append(el, children);
  return el;
}

/**
 * Say something to assistive technology through the page's polite status region (the
 * text is cleared first, so the same words said twice are announced twice).
 */
export function announce(text) {
  const region = document.getElementById("announce");
  region.textContent = "";
  requestAnimationFrame(() => {
    region.textContent = text;
  });
}

/** Show an error's text in an alert region (empty text hides it). */
export function showError(region, text) {
  region.textContent = text ?? "";
  region.hidden = !text;
}

/** A time as people read it here ("14:03:27", or with the date when not today). */
export function when(iso) {
  if (!iso) return "";
  const at = new Date(iso);
  if (Number.isNaN(at.getTime())) return String(iso);
  const today = new Date().toDateString() === at.toDateString();
  return today ? at.toLocaleTimeString() : at.toLocaleString();
}

/** An id for one message a person sends, kept until the run has taken it. */
export function clientId() {
  if (crypto.randomUUID) return crypto.randomUUID();
  // randomUUID needs a secure context; getRandomValues does not
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
}
