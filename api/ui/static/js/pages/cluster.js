// Cluster: workers, queues and the fleet's live rates from GET /metrics/cluster (the numbers behind /metrics),
// polled every two seconds. Counters are cumulative; rates come from the difference between two polls.
import { api } from "../api.js";
import { Sparkline } from "../chart.js";
import { ago, chip, h, num, table } from "../dom.js";

const POLL_MS = 2000;

export function render(root, { signal }) {
  const nats = h("span", { id: "nats-state" }, "…");
  const error = h("p", { class: "error", role: "alert", id: "cluster-error" });
  const workers = h("div", { id: "workers" });
  const queues = h("div", { id: "queues" });
  const updated = h("span", { class: "muted", id: "cluster-updated" });
  const tokens = new Sparkline("Tokens per second", "tok/s");
  const ttft = new Sparkline("Time to first token (mean)", "ms", { digits: 0 });
  root.append(
    h("div", { class: "row", style: "justify-content:space-between" }, h("h1", {}, "Cluster"),
      h("span", {}, h("span", { class: "muted" }, "NATS: "), nats, " ", updated)), error,
    h("div", { class: "grid cols-even" }, tokens.el, ttft.el),
    h("section", { class: "panel", "aria-labelledby": "workers-title", style: "margin-top:1rem" },
      h("h2", { id: "workers-title" }, "Workers"), workers),
    h("section", { class: "panel", "aria-labelledby": "queues-title", style: "margin-top:1rem" },
      h("h2", { id: "queues-title" }, "Queues"), queues));

  let previous = null;
  let timer = null;
  const poll = async () => {
    let status;
    try {
      status = await api("/metrics/cluster", { signal });
    } catch (err) {
      if (err.name !== "AbortError") error.textContent = err.message;
      return;
    }
    error.textContent = status.error ?? "";
    const rates = ratesBetween(previous, status);
    previous = status;
    showNats(nats, status.nats);
    updated.textContent = `· updated ${new Date(status.time * 1000).toLocaleTimeString()}`;
    tokens.push(rates.fleetTokens);
    ttft.push(rates.ttftMs);
    workers.replaceChildren(workerTable(status.workers, rates));
    queues.replaceChildren(queueTable(status, rates));
  };
  const tick = () => poll().finally(() => {
    if (!signal.aborted) timer = setTimeout(tick, POLL_MS);
  });
  signal.addEventListener("abort", () => clearTimeout(timer));
  tick();
}

function showNats(el, state) {
  const tone = state.state === "connected" ? "ok" : state.state === "reconnecting" ? "warn" : "bad";
  el.replaceChildren(h("span", { class: `dot ${tone}`, "aria-hidden": "true" }), state.state,
    state.server ? h("span", { class: "muted" }, ` (${state.server}, ${state.reconnects} reconnects)`) : null);
}

/** Per-worker tokens/s, per-model requests/s, the fleet's tokens/s and mean TTFT since the previous poll. */
function ratesBetween(before, now) {
  const out = { tokens: {}, drain: {}, fleetTokens: null, ttftMs: null };
  if (!before) return out;
  const old = Object.fromEntries(before.workers.filter((w) => w.metrics).map((w) => [w.worker_id, w.metrics]));
  let fleet = 0;
  let ttftSum = 0;
  let ttftCount = 0;
  for (const worker of now.workers) {
    const a = old[worker.worker_id];
    const b = worker.metrics;
    if (!a || !b || b.sent_at <= a.sent_at) continue;
    const dt = b.sent_at - a.sent_at;
    const perSecond = (b.generation_tokens_total - a.generation_tokens_total) / dt;
    out.tokens[worker.worker_id] = perSecond;
    fleet += perSecond;
    out.drain[worker.model] = (out.drain[worker.model] ?? 0) + (b.requests_total - a.requests_total) / dt;
    ttftSum += b.ttft_sum - a.ttft_sum;
    ttftCount += b.ttft_count - a.ttft_count;
  }
  out.fleetTokens = fleet;
  out.ttftMs = ttftCount > 0 ? (ttftSum / ttftCount) * 1000 : null; // null: no first token in this interval
  return out;
}

function workerTable(workers, rates) {
  const rows = workers.map((w) => h("tr", { "data-worker-id": w.worker_id },
    h("td", {}, h("code", { title: `${w.host} pid ${w.pid}` }, w.worker_id)),
    h("td", {}, w.model),
    h("td", { class: "hide-narrow" }, w.device, w.dtype !== "none" ? h("span", { class: "muted" }, ` · ${w.dtype}`) : null),
    h("td", { class: "num" }, `${w.running} / ${w.free}`),
    h("td", { class: "num" }, num(rates.tokens[w.worker_id])),
    h("td", {}, w.metrics ? ago(w.last_heartbeat) : chip("not answering", "warn"))));
  return table(["Worker", "Model", ["Device", "hide-narrow"], ["Slots busy / free", "num"], ["Tokens/s", "num"],
    "Last heartbeat"], rows, { empty: "No live workers. Start one with `inferq worker --model …`." });
}

function queueTable(status, rates) {
  const byModel = {};
  for (const q of status.queues) byModel[q.model] = { ...(byModel[q.model] ?? {}), [q.lane]: q.waiting };
  for (const w of status.workers) byModel[w.model] ??= {};
  const rows = Object.entries(byModel).sort().map(([model, lanes]) => h("tr", { "data-model": model },
    h("td", {}, model),
    h("td", { class: "num" }, lanes.interactive ?? 0),
    h("td", { class: "num" }, lanes.batch ?? 0),
    h("td", { class: "num" }, num(rates.drain[model], 2)),
    h("td", { class: "num" }, status.workers.filter((w) => w.model === model).length)));
  return table(["Model", ["Queued (interactive)", "num"], ["Queued (batch)", "num"], ["Drain (req/s)", "num"],
    ["Workers", "num"]], rows, { empty: "No model queues yet." });
}
