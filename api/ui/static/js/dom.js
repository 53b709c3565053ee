// Small DOM helpers shared by the pages: element building, field errors, formatting, polling.

/** h("button", {class: "primary", onclick}, "Send") → an element; children may be strings, nodes or arrays. */
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) el.addEventListener(name.slice(2), value);
    else if (name === "class") el.className = value;
    else if (name in el && typeof value !== "string") el[name] = value;
    else el.setAttribute(name, value === true ? "" : value);
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
}

/** A labelled field: label, control, optional hint, and the error line that `showError` fills. */
export function field(label, control, { hint } = {}) {
  const id = control.id || `f-${Math.random().toString(36).slice(2, 9)}`;
  control.id = id;
  const error = h("p", { class: "error", id: `${id}-error`, role: "alert" });
  const described = [hint ? `${id}-hint` : null, `${id}-error`].filter(Boolean).join(" ");
  control.setAttribute("aria-describedby", described);
  return h("div", { class: "field" }, h("label", { for: id }, label), control,
    hint ? h("span", { class: "hint", id: `${id}-hint` }, hint) : null, error);
}

/** Show (or clear, with a falsy message) the error next to a control made by `field`. */
export function showError(control, message) {
  const line = document.getElementById(`${control.id}-error`);
  if (line) line.textContent = message || "";
  if (message) control.setAttribute("aria-invalid", "true");
  else control.removeAttribute("aria-invalid");
}

export function clearErrors(root) {
  for (const line of root.querySelectorAll(".error")) line.textContent = "";
  for (const el of root.querySelectorAll("[aria-invalid]")) el.removeAttribute("aria-invalid");
}

export function table(headers, rows, { empty = "Nothing yet." } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  const head = h("tr", {}, headers.map((title) => {
    const [text, cls] = Array.isArray(title) ? title : [title, null];
    return h("th", { scope: "col", class: cls }, text);
  }));
  return h("div", { class: "table-wrap" }, h("table", {}, h("thead", {}, head), h("tbody", {}, rows)));
}

export function ago(unixSeconds) {
  if (!unixSeconds) return "—";
  const s = Math.max(0, Date.now() / 1000 - unixSeconds);
  if (s < 60) return `${s.toFixed(s < 10 ? 1 : 0)} s ago`;
  if (s < 3600) return `${Math.floor(s / 60)} min ago`;
  return new Date(unixSeconds * 1000).toLocaleString();
}

export function when(unixSeconds) {
  return unixSeconds ? new Date(unixSeconds * 1000).toLocaleString() : "—";
}

export function num(value, digits = 1) {
  return value === null || value === undefined || Number.isNaN(value) ? "—" : Number(value).toFixed(digits);
}

export function chip(text, tone) {
  return h("span", { class: `chip ${tone || ""}` }, text);
}

/** Run `fn` now and every `ms` until the page is left (the returned stop function, also on `signal` abort). */
export function every(ms, fn, signal) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    try {
      await fn();
    } catch {
      // each page shows its own errors; a failed tick only waits for the next
    } finally {
      if (!stopped) timer = setTimeout(tick, ms);
    }
  };
  const stop = () => {
    stopped = true;
    clearTimeout(timer);
  };
  signal?.addEventListener("abort", stop);
  tick();
  return stop;
}

/** Swap a live-refreshed region's content without losing keyboard focus: the focused control is found again in
 * the new content by its row (`data-key`) and its text. */
export function refreshRegion(container, content) {
  const focused = container.contains(document.activeElement) ? document.activeElement : null;
  const key = focused && focused.closest("[data-key]")?.dataset.key;
  const text = focused?.textContent;
  container.replaceChildren(content);
  if (!focused) return;
  const again = [...container.querySelectorAll(`[data-key="${CSS.escape(key ?? "")}"] button, [data-key="${
    CSS.escape(key ?? "")}"] a`)].find((el) => el.textContent === text);
  (again ?? container).focus?.();
}
