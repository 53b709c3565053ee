// Every call the console makes to the API: the bearer credential (kept in this tab's sessionStorage), the API's
// error shape turned into ApiError, server-sent events read from a fetch body (EventSource cannot send a header),
// and the connection banner: a network failure shows it, the first answer after that hides it again.

const CREDENTIAL = "inferq.credential";
const IS_LOGIN = "inferq.credential-is-login"; // a login token (revoked on sign-out), not an API key
const listeners = new Set();
let offline = false;

export class ApiError extends Error {
  constructor(status, body) {
    const error = (body && body.error) || {};
    super(typeof error === "object" && error.message ? error.message : `HTTP ${status}`);
    this.status = status;
    this.param = error.param || null;
    this.code = error.code || null;
  }
}

export const credential = {
  get: () => sessionStorage.getItem(CREDENTIAL),
  isLogin: () => sessionStorage.getItem(IS_LOGIN) === "1",
  set: (value, { login = false } = {}) => {
    sessionStorage.setItem(CREDENTIAL, value);
    sessionStorage.setItem(IS_LOGIN, login ? "1" : "0");
  },
  clear: () => {
    sessionStorage.removeItem(CREDENTIAL);
    sessionStorage.removeItem(IS_LOGIN);
  },
};

/** `fn(isOffline)` on every change of the connection state. */
export function onConnectionChange(fn) {
  listeners.add(fn);
  return () => listeners.delete(fn);
}

function setOffline(value) {
  if (offline === value) return;
  offline = value;
  for (const fn of listeners) fn(value);
  if (value) probeUntilBack();
}

async function probeUntilBack() {
  while (offline) {
    await new Promise((resolve) => setTimeout(resolve, 1500));
    try {
      await fetch("/health", { cache: "no-store" });
      setOffline(false);
    } catch {
      // still away: try again
    }
  }
}

export function isOffline() {
  return offline;
}

/** fetch with the credential; network failures flip the banner, aborts pass through untouched. */
export async function raw(path, options = {}) {
  const headers = new Headers(options.headers || {});
  const key = credential.get();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  let response;
  try {
    response = await fetch(path, { ...options, headers });
  } catch (err) {
    if (err.name !== "AbortError") setOffline(true);
    throw err;
  }
  setOffline(false);
  return response;
}

async function errorFrom(response) {
  let body = null;
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page): the status says enough
  }
  return new ApiError(response.status, body);
}

/** JSON in, JSON out; a non-2xx answer throws ApiError with the API's message. */
export async function api(path, { method = "GET", body, signal, form } = {}) {
  const options = { method, signal };
  if (form) options.body = form;
  else if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers = { "Content-Type": "application/json" };
  }
  const response = await raw(path, options);
  if (!response.ok) throw await errorFrom(response);
  return response.status === 204 ? null : response.json();
}

/** POST/GET that answers with server-sent events: `onEvent(name, data)` per event until the stream ends. */
export async function sse(path, { method = "GET", body, signal, onEvent }) {
  const options = { method, signal, headers: { Accept: "text/event-stream" } };
  if (body !== undefined) {
    options.body = JSON.stringify(body);
    options.headers["Content-Type"] = "application/json";
  }
  const response = await raw(path, options);
  if (!response.ok) throw await errorFrom(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let name = "message";
  let data = [];
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let newline;
    while ((newline = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, newline).replace(/\r$/, "");
      buffer = buffer.slice(newline + 1);
      if (line === "") {
        if (data.length) onEvent(name, data.join("\n"));
        name = "message";
        data = [];
      } else if (line.startsWith("event:")) name = line.slice(6).trim();
      else if (line.startsWith("data:")) data.push(line.slice(5).replace(/^ /, ""));
    }
  }
  if (data.length) onEvent(name, data.join("\n"));
}

/** Download an API file (with the credential) under `filename`. */
export async function download(path, filename) {
  const response = await raw(path);
  if (!response.ok) throw await errorFrom(response);
  const url = URL.createObjectURL(await response.blob());
  const link = Object.assign(document.createElement("a"), { href: url, download: filename });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 10_000);
}
