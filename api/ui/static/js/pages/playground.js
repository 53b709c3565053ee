// Playground: chat with a model, tokens streamed over SSE from /v1/chat/completions, stop = abort the fetch (the
// API cancels the generation when the client goes). Shows TTFT and usage, and the request as curl / Python.
import { api, ApiError, sse } from "../api.js";
import { clearErrors, field, h, showError } from "../dom.js";

const NUMBER_PARAMS = [
  // [id, label, body key, parse, attributes]
  ["temperature", "Temperature", "temperature", parseFloat, { min: 0, max: 2, step: 0.1, value: "0.7" }],
  ["top-p", "top_p", "top_p", parseFloat, { min: 0, max: 1, step: 0.05, value: "1" }],
  ["max-tokens", "Max tokens", "max_tokens", (v) => parseInt(v, 10), { min: 1, step: 1, value: "256" }],
  ["seed", "Seed", "seed", (v) => parseInt(v, 10), { step: 1, placeholder: "random" }],
];

export function render(root, { signal }) {
  const history = []; // {role, content} of the conversation so far
  let running = null; // the AbortController of the generation in flight
  let lastBody = null;

  const model = h("select", { id: "model", name: "model" });
  const system = h("textarea", { id: "system", rows: 2, placeholder: "You are a helpful assistant." });
  const numbers = NUMBER_PARAMS.map(([id, label, , , attrs]) => [id, h("input", { id, type: "number", ...attrs })]);
  const stop = h("input", { id: "stop", placeholder: "comma-separated, e.g. \\n\\n,END" });
  const schema = h("textarea", { id: "schema", class: "code", rows: 4, spellcheck: false,
    placeholder: '{"type": "object", "properties": {"answer": {"type": "string"}}}' });
  const tools = h("textarea", { id: "tools", class: "code", rows: 4, spellcheck: false,
    placeholder: '[{"type": "function", "function": {"name": "get_weather", "parameters": {...}}}]' });
  const prompt = h("textarea", { id: "prompt", rows: 3, placeholder: "Ask something… (Ctrl+Enter sends)" });
  const send = h("button", { type: "submit", class: "primary", id: "send" }, "Send");
  const stopButton = h("button", { type: "button", id: "stop-generation", disabled: true }, "Stop");
  const clear = h("button", { type: "button", class: "ghost" }, "New chat");
  const chat = h("div", { class: "chat", id: "chat", "aria-label": "Conversation", role: "log" },
    h("p", { class: "empty hint-empty" }, "Pick a model, write a message and press Send (or Ctrl+Enter)."));
  const status = h("p", { class: "muted", id: "chat-status", role: "status", "aria-live": "polite" });
  const ttft = h("b", { id: "ttft" }, "—");
  const usage = h("b", { id: "usage" }, "—");
  const rate = h("b", { id: "rate" }, "—");
  const snippet = h("pre", { class: "snippet", id: "snippet", tabindex: "0", "aria-label": "Request as code" });
  const copyCurl = h("button", { type: "button", class: "small", id: "copy-curl" }, "Copy as curl");
  const copyPython = h("button", { type: "button", class: "small", id: "copy-python" }, "Copy as Python (openai SDK)");

  const composer = h("form", { class: "composer stack", "aria-label": "Message" },
    field("Message", prompt), h("div", { class: "row end" }, clear, stopButton, send));
  root.append(h("h1", {}, "Playground"), h("div", { class: "grid cols-2" },
    h("section", { class: "panel stack", "aria-label": "Chat" }, chat,
      h("div", { class: "stats" }, h("span", {}, "TTFT ", ttft), h("span", {}, "Usage ", usage),
        h("span", {}, "Speed ", rate)), status, composer,
      h("div", { class: "row" }, copyCurl, copyPython),
      h("details", {}, h("summary", {}, "Request as code"), snippet)),
    h("aside", { class: "panel", "aria-label": "Settings" },
      field("Model", model), field("System prompt", system),
      h("div", { class: "params" }, numbers.map(([, input], i) => field(NUMBER_PARAMS[i][1], input))),
      field("Stop sequences", stop),
      field("JSON schema (structured output)", schema, { hint: "Optional: the answer must match this schema." }),
      field("Tools", tools, { hint: "Optional: a JSON array of OpenAI tool definitions." }))));

  loadModels(model, signal);

  function bubble(role, text = "") {
    chat.querySelector(".hint-empty")?.remove();
    const content = h("span", { class: "content" }, text);
    const el = h("div", { class: `msg ${role}` }, h("span", { class: "role" }, role), content);
    chat.append(el);
    chat.scrollTop = chat.scrollHeight;
    return { el, content };
  }

  /** The request body from the form, or null after showing what is wrong next to the field. */
  function buildBody(userText) {
    clearErrors(root);
    const body = { model: model.value, stream: true, stream_options: { include_usage: true }, messages: [] };
    if (system.value.trim()) body.messages.push({ role: "system", content: system.value });
    body.messages.push(...history, { role: "user", content: userText });
    let ok = true;
    numbers.forEach(([, input], i) => {
      const [, , key, parse] = NUMBER_PARAMS[i];
      if (input.value === "") return;
      const value = parse(input.value);
      if (Number.isNaN(value)) {
        showError(input, "not a number");
        ok = false;
      } else body[key] = value;
    });
    const stops = stop.value.split(",").map((s) => s.replace(/\\n/g, "\n")).filter((s) => s.length);
    if (stops.length) body.stop = stops;
    const parsedSchema = parseJson(schema, "the schema");
    if (parsedSchema === undefined) ok = false;
    else if (parsedSchema !== null) {
      body.response_format = { type: "json_schema", json_schema: { name: "output", schema: parsedSchema } };
    }
    const parsedTools = parseJson(tools, "the tools");
    if (parsedTools === undefined) ok = false;
    else if (parsedTools !== null) body.tools = parsedTools;
    if (!model.value) {
      showError(model, "no model is being served yet");
      ok = false;
    }
    return ok ? body : null;
  }

  function parseJson(box, what) {
    if (!box.value.trim()) return null;
    try {
      return JSON.parse(box.value);
    } catch (err) {
      showError(box, `${what} is not valid JSON: ${err.message}`);
      return undefined;
    }
  }

  /** The API's 4xx goes next to the field it is about (its `param`, else what the message names). */
  function placeError(err, body) {
    const text = `${err.param ?? ""} ${err.message}`;
    if (body.response_format && /response_format|schema|structured output|constraint/i.test(text)) {
      return showError(schema, err.message);
    }
    // Tools are forced by a constraint too (a worker that cannot enforce one refuses it in those words).
    if (body.tools && /tool|constraint/i.test(text)) return showError(tools, err.message);
    const byParam = { model, temperature: numbers[0][1], top_p: numbers[1][1], max_tokens: numbers[2][1],
      seed: numbers[3][1], stop };
    const target = Object.entries(byParam).find(([key]) => text.includes(key));
    showError(target ? target[1] : prompt, err.message);
  }

  async function generate(event) {
    event.preventDefault();
    const userText = prompt.value.trim();
    if (!userText || running) return;
    const body = buildBody(userText);
    if (!body) return;
    lastBody = body;
    showSnippet("curl");
    const question = bubble("user", userText);
    const answer = bubble("assistant");
    running = new AbortController();
    signal.addEventListener("abort", () => running?.abort());
    setRunning(true);
    status.textContent = "Generating…";
    ttft.textContent = usage.textContent = rate.textContent = "—";
    const started = performance.now();
    let first = null;
    let text = "";
    let tokens = 0;
    try {
      await sse("/v1/chat/completions", { method: "POST", body, signal: running.signal, onEvent: (_, data) => {
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(500, chunk);
        const delta = chunk.choices?.[0]?.delta ?? {};
        const piece = delta.content ?? "";
        if (piece || delta.tool_calls) {
          if (first === null) {
            first = performance.now();
            ttft.textContent = `${Math.round(first - started)} ms`;
          }
          tokens += 1;
          text += piece;
          if (delta.tool_calls) text += JSON.stringify(delta.tool_calls);
          answer.content.textContent = text;
          chat.scrollTop = chat.scrollHeight;
        }
        if (chunk.usage) {
          const u = chunk.usage;
          usage.textContent = `${u.prompt_tokens} prompt + ${u.completion_tokens} completion`;
          tokens = u.completion_tokens;
        }
      } });
      status.textContent = "Done.";
      history.push({ role: "user", content: userText }, { role: "assistant", content: text });
      prompt.value = "";
    } catch (err) {
      if (err.name === "AbortError") {
        answer.el.classList.add("stopped");
        status.textContent = "Stopped.";
        if (text) history.push({ role: "user", content: userText }, { role: "assistant", content: text });
      } else {
        answer.el.remove();
        question.el.remove(); // the message stays in the box, to fix and send again
        status.textContent = "";
        if (err instanceof ApiError) placeError(err, body);
        else showError(prompt, `the request failed: ${err.message}`);
      }
    } finally {
      if (first !== null && tokens > 1) {
        rate.textContent = `${((tokens - 1) / ((performance.now() - first) / 1000)).toFixed(1)} tok/s`;
      }
      running = null;
      setRunning(false);
    }
  }

  function setRunning(on) {
    send.disabled = on;
    stopButton.disabled = !on;
    if (on) stopButton.focus();
    else if (document.activeElement === stopButton || document.activeElement === document.body) prompt.focus();
  }

  function showSnippet(kind) {
    if (!lastBody) lastBody = buildBody(prompt.value || "Hello!");
    if (!lastBody) return null;
    snippet.textContent = kind === "curl" ? asCurl(lastBody) : asPython(lastBody);
    return snippet.textContent;
  }

  async function copy(kind, button) {
    lastBody = null;
    const text = showSnippet(kind);
    if (text === null) return;
    snippet.closest("details").open = true;
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied ✓";
    } catch {
      button.textContent = "Shown below (select to copy)";
    }
    setTimeout(() => {
      button.textContent = kind === "curl" ? "Copy as curl" : "Copy as Python (openai SDK)";
    }, 1500);
  }

  composer.addEventListener("submit", generate);
  prompt.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) composer.requestSubmit();
  });
  stopButton.addEventListener("click", () => running?.abort());
  clear.addEventListener("click", () => {
    history.length = 0;
    chat.replaceChildren();
    status.textContent = "";
    prompt.focus();
  });
  copyCurl.addEventListener("click", () => copy("curl", copyCurl));
  copyPython.addEventListener("click", () => copy("python", copyPython));
}

async function loadModels(select, signal) {
  try {
    const { data } = await api("/v1/models", { signal });
    select.replaceChildren(...data.map((m) => h("option", { value: m.id }, m.id)));
    if (!data.length) showError(select, "no model is being served yet");
  } catch (err) {
    if (err.name !== "AbortError") showError(select, err.message);
  }
}

function origin() {
  return window.location.origin;
}

export function asCurl(body) {
  const json = JSON.stringify(body, null, 2).replace(/'/g, "'\\''");
  return `curl -N ${origin()}/v1/chat/completions \\\n  -H "Content-Type: application/json" \\\n` +
    `  -H "Authorization: Bearer $INFERQ_API_KEY" \\\n  -d '${json}'`;
}

export function asPython(body) {
  const { model, messages, stream, ...rest } = body;
  const extras = Object.entries(rest).map(([key, value]) => `    ${key}=${pyValue(value)},\n`).join("");
  return `import os\nfrom openai import OpenAI\n\n` +
    `client = OpenAI(base_url="${origin()}/v1", api_key=os.environ.get("INFERQ_API_KEY", "none"))\n` +
    `stream = client.chat.completions.create(\n    model=${pyValue(model)},\n` +
    `    messages=${pyValue(messages)},\n    stream=${stream ? "True" : "False"},\n${extras})\n` +
    `for chunk in stream:\n    if chunk.choices and chunk.choices[0].delta.content:\n` +
    `        print(chunk.choices[0].delta.content, end="", flush=True)\nprint()\n`;
}

function pyValue(value) {
  if (value === null) return "None";
  if (typeof value === "boolean") return value ? "True" : "False";
  if (Array.isArray(value)) return `[${value.map(pyValue).join(", ")}]`;
  if (typeof value === "object") {
    return `{${Object.entries(value).map(([key, item]) => `${JSON.stringify(key)}: ${pyValue(item)}`).join(", ")}}`;
  }
  return JSON.stringify(value); // numbers, and strings (a JSON string is a valid Python literal)
}
