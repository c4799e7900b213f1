// A form for a tool's arguments, made from the tool's JSON schema: text, numbers and
// integers (with their bounds), booleans as checkboxes, enums as selects, anything else as
// JSON. The browser's own constraint checks give each field its message; the API's answer
// is shown beside the form by whoever sends it.

import { h, uid } from "./dom.js";

/** Follow `$ref`s into the schema's `$defs`, and `allOf: [one]` wrappers. */
function resolve(node, root, seen = 0) {
  if (!node || typeof node !== "object" || seen > 20) return node ?? {};
  if (typeof node.$ref === "string") {
    const path = node.$ref.replace(/^#\//, "").split("/");
    let target = root;
    for (const part of path) target = target?.[part];
    const { $ref, ...rest } = node;
    return resolve({ ...target, ...rest }, root, seen + 1);
  }
  if (Array.isArray(node.allOf) && node.allOf.length === 1) {
    const { allOf, ...rest } = node;
    return resolve({ ...resolve(allOf[0], root, seen + 1), ...rest }, root, seen + 1);
  }
  return node;
}

/** The field's kind and schema, seeing through `anyOf: [X, {type: null}]` (optional X). */
function kindOf(raw, root) {
  let schema = resolve(raw, root);
  let nullable = false;
  const options = schema.anyOf ?? schema.oneOf;
  if (Array.isArray(options)) {
    const real = options.map((o) => resolve(o, root)).filter((o) => o.type !== "null");
    nullable = real.length < options.length;
    if (real.length === 1) schema = { ...schema, ...real[0], anyOf: undefined, oneOf: undefined };
  }
  let type = schema.type;
  if (Array.isArray(type)) {
    nullable = nullable || type.includes("null");
    const real = type.filter((t) => t !== "null");
    type = real.length === 1 ? real[0] : undefined;
  }
  if (Array.isArray(schema.enum)) return { kind: "enum", schema, nullable };
  if (schema.const !== undefined)
    return { kind: "enum", schema: { ...schema, enum: [schema.const] }, nullable };
  if (["string", "number", "integer", "boolean"].includes(type))
    return { kind: type, schema, nullable };
  return { kind: "json", schema, nullable };
}

function labelOf(name, schema) {
  return schema.title && schema.title.toLowerCase() !== name.toLowerCase()
    ? `${schema.title} (${name})`
    : name;
}

/** One field: its control, label, hint and error, and how to read its value back. */
function field(name, raw, root, required, value, present) {
  const { kind, schema } = kindOf(raw, root);
  const id = uid(`arg-${name}`);
  const hintId = `${id}-hint`;
  const errorId = `${id}-error`;
  const hints = [];
  if (schema.description) hints.push(schema.description);
  let control;
  if (kind === "enum") {
    control = h("select", { id, name, required });
    if (!required) control.append(h("option", { value: "" }, "(none)"));
    schema.enum.forEach((v, i) => {
      const chosen = present && JSON.stringify(v) === JSON.stringify(value);
      control.append(h("option", { value: String(i), selected: chosen }, String(v)));
    });
  } else if (kind === "boolean") {
    control = h("input", {
      id,
      name,
      type: "checkbox",
      checked: present ? Boolean(value) : Boolean(schema.default),
    });
  } else if (kind === "number" || kind === "integer") {
    const bounds = numberBounds(schema, kind, hints);
    control = h("input", {
      id,
      name,
      type: "number",
      inputmode: kind === "integer" ? "numeric" : "decimal",
      step: kind === "integer" ? "1" : "any",
      min: bounds.min,
      max: bounds.max,
      required,
      value: present && value !== null ? String(value) : "",
    });
    control.addEventListener("input", () => checkExclusive(control, schema));
  } else if (kind === "string") {
    const long = (schema.maxLength ?? 0) > 200 || (present && String(value ?? "").length > 80);
    control = h(long ? "textarea" : "input", {
      id,
      name,
      type: long ? undefined : "text",
      required,
      minlength: schema.minLength,
      maxlength: schema.maxLength,
      pattern: schema.pattern,
      rows: long ? 3 : undefined,
    });
    control.value = present && value !== null ? String(value) : "";
    if (schema.pattern) hints.push(`Must match ${schema.pattern}.`);
  } else {
    control = h("textarea", { id, name, rows: 3, required, spellcheck: "false" });
    control.value = present ? JSON.stringify(value, null, 2) : "";
    hints.push("JSON.");
    control.addEventListener("input", () => checkJson(control));
  }
  const hint = hints.length ? h("p", { id: hintId, class: "hint" }, hints.join(" ")) : null;
  const error = h("p", { id: errorId, class: "field-error", hidden: true });
  control.setAttribute(
    "aria-describedby",
    [hint ? hintId : null, errorId].filter(Boolean).join(" "),
  );
  const label = h(
    "label",
    { for: id },
    labelOf(name, schema),
    required ? h("span", { class: "required" }, " (required)") : null,
  );
  const wrapper = h(
    "div",
    { class: kind === "boolean" ? "field check" : "field" },
    kind === "boolean" ? [control, label] : [label, control],
    hint,
    error,
  );

  const read = () => {
    if (kind === "boolean") return { set: true, value: control.checked };
    const text = control.value;
    if (text === "" && kind !== "string") return { set: false };
    if (text === "" && !required && !present) return { set: false };
    if (kind === "enum") return { set: true, value: schema.enum[Number(text)] };
    if (kind === "integer" || kind === "number") return { set: true, value: Number(text) };
    if (kind === "json") return { set: true, value: JSON.parse(text) };
    return { set: true, value: text };
  };
  const check = () => {
    if (kind === "number" || kind === "integer") checkExclusive(control, schema);
    if (kind === "json") checkJson(control);
    const ok = control.checkValidity();
    error.textContent = ok ? "" : control.validationMessage;
    error.hidden = ok;
    if (ok) control.removeAttribute("aria-invalid");
    else control.setAttribute("aria-invalid", "true");
    return ok;
  };
  // a field found wrong is checked again as it is corrected, while typing: checking it on
  // blur instead would move the form under the pointer of a person pressing its button
  const again = kind === "enum" || kind === "boolean" ? "change" : "input";
  control.addEventListener(again, () => {
    if (control.hasAttribute("aria-invalid")) check();
  });
  return { name, wrapper, control, read, check };
}

function numberBounds(schema, kind, hints) {
  const min = schema.minimum ?? schema.exclusiveMinimum;
  const max = schema.maximum ?? schema.exclusiveMaximum;
  const parts = [];
  if (schema.exclusiveMinimum !== undefined) parts.push(`more than ${schema.exclusiveMinimum}`);
  else if (schema.minimum !== undefined) parts.push(`at least ${schema.minimum}`);
  if (schema.exclusiveMaximum !== undefined) parts.push(`less than ${schema.exclusiveMaximum}`);
  else if (schema.maximum !== undefined) parts.push(`at most ${schema.maximum}`);
  const what = kind === "integer" ? "A whole number" : "A number";
  hints.push(parts.length ? `${what}, ${parts.join(" and ")}.` : `${what}.`);
  return { min, max };
}

function checkExclusive(control, schema) {
  const v = control.valueAsNumber;
  let message = "";
  if (!Number.isNaN(v)) {
    if (schema.exclusiveMinimum !== undefined && v <= schema.exclusiveMinimum) {
      message = `Must be more than ${schema.exclusiveMinimum}.`;
    } else if (schema.exclusiveMaximum !== undefined && v >= schema.exclusiveMaximum) {
      message = `Must be less than ${schema.exclusiveMaximum}.`;
    }
  }
  control.setCustomValidity(message);
}

function checkJson(control) {
  let message = "";
  if (control.value.trim()) {
    try {
      JSON.parse(control.value);
    } catch (e) {
      message = `Not valid JSON: ${e.message}`;
    }
  }
  control.setCustomValidity(message);
}

/**
 * The fields for `schema` (an object schema), filled with `values`. `read()` checks every
 * field (showing each one's message, focusing the first wrong one) and answers the
 * arguments, or null when a field is wrong.
 */
export function schemaFields(schema, values = {}) {
  const root = schema ?? {};
  let properties = resolve(root, root).properties;
  const required = new Set(resolve(root, root).required ?? []);
  if (!properties) {
    // no schema to go by: a field for each argument the call has, of its value's kind
    const kinds = { number: "number", boolean: "boolean", string: "string" };
    properties = Object.fromEntries(
      Object.entries(values).map(([k, v]) => [k, kinds[typeof v] ? { type: kinds[typeof v] } : {}]),
    );
  }
  const names = Object.keys(properties);
  // arguments the schema does not describe are kept as they are
  const extra = Object.keys(values).filter((k) => !(k in properties));
  const fields = names.map((n) =>
    field(n, properties[n], root, required.has(n), values[n], n in values),
  );
  const element = h(
    "div",
    { class: "fields" },
    fields.map((f) => f.wrapper),
  );
  if (!names.length) element.append(h("p", { class: "hint" }, "This tool takes no arguments."));
  const read = () => {
    const wrong = fields.filter((f) => !f.check());
    if (wrong.length) {
      wrong[0].control.focus();
      return null;
    }
    const out = Object.fromEntries(extra.map((k) => [k, values[k]]));
    for (const f of fields) {
      const got = f.read();
      if (got.set) out[f.name] = got.value;
    }
    return out;
  };
  return { element, read };
}
