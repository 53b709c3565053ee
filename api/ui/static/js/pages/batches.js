// Batches: upload a JSONL file (POST /v1/files), start a batch over it (POST /v1/batches), watch every batch's
// progress (polled), cancel one, download its output and error files.
import { api, ApiError, download } from "../api.js";
import { chip, clearErrors, every, field, h, refreshRegion, showError, table, when } from "../dom.js";

const FINAL = new Set(["completed", "failed", "cancelled", "expired"]);
const TONE = { completed: "ok", failed: "bad", cancelled: "warn", expired: "bad", cancelling: "warn" };

export function render(root, { signal }) {
  const file = h("input", { id: "batch-file", type: "file", accept: ".jsonl,application/jsonl,text/plain" });
  const endpoint = h("select", { id: "batch-endpoint" },
    ["/v1/chat/completions", "/v1/completions", "/v1/embeddings"].map((e) => h("option", { value: e }, e)));
  const submit = h("button", { type: "submit", class: "primary", id: "batch-submit" }, "Upload and start");
  const note = h("p", { class: "muted", role: "status", id: "batch-note" });
  const list = h("div", { id: "batch-list" });
  const listError = h("p", { class: "error", role: "alert" });
  const form = h("form", { class: "panel", "aria-labelledby": "new-batch" },
    h("h2", { id: "new-batch" }, "New batch"),
    h("p", { class: "muted" }, "One request per line: ",
      h("code", {}, '{"custom_id": "1", "method": "POST", "url": "/v1/chat/completions", "body": {…}}')),
    h("div", { class: "grid cols-even" }, field("JSONL file", file), field("Endpoint", endpoint)),
    h("div", { class: "row end" }, note, submit));
  root.append(h("h1", {}, "Batches"), form,
    h("section", { class: "panel", "aria-labelledby": "batches-title", style: "margin-top:1rem" },
      h("h2", { id: "batches-title" }, "Batches"), listError, list));

  const refresh = async () => {
    try {
      const { data } = await api("/v1/batches?limit=50", { signal });
      listError.textContent = "";
      refreshRegion(list, batchTable(data, refresh, listError));
    } catch (err) {
      if (err.name !== "AbortError") listError.textContent = err.message;
    }
  };
  every(2000, refresh, signal);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    if (!file.files.length) return showError(file, "choose a JSONL file first");
    submit.disabled = true;
    note.textContent = "Uploading…";
    try {
      const upload = new FormData();
      upload.append("purpose", "batch");
      upload.append("file", file.files[0]);
      let uploaded;
      try {
        uploaded = await api("/v1/files", { method: "POST", form: upload });
      } catch (err) {
        if (err instanceof ApiError) return showError(file, err.message);
        throw err;
      }
      note.textContent = "Starting…";
      try {
        await api("/v1/batches", { method: "POST", body: {
          input_file_id: uploaded.id, endpoint: endpoint.value, completion_window: "24h" } });
      } catch (err) {
        if (err instanceof ApiError) return showError(err.param === "endpoint" ? endpoint : file, err.message);
        throw err;
      }
      form.reset();
      note.textContent = `Started a batch over ${uploaded.filename}.`;
      await refresh();
    } catch (err) {
      showError(file, err.message);
    } finally {
      submit.disabled = false;
      if (note.textContent.endsWith("…")) note.textContent = "";
    }
  });
}

function batchTable(batches, refresh, errorLine) {
  const rows = batches.map((b) => {
    const counts = b.request_counts ?? { total: 0, completed: 0, failed: 0 };
    const done = counts.completed + counts.failed;
    const progress = h("progress", { max: Math.max(counts.total, 1), value: done,
      "aria-label": `${b.id} progress` });
    const actions = h("div", { class: "row" });
    if (!FINAL.has(b.status) && b.status !== "cancelling") {
      actions.append(h("button", { type: "button", class: "small danger", onclick: async (event) => {
        event.target.disabled = true;
        await api(`/v1/batches/${b.id}/cancel`, { method: "POST" }).catch((err) => {
          errorLine.textContent = err.message;
        });
        await refresh();
      } }, "Cancel"));
    }
    for (const [key, label] of [["output_file_id", "Output"], ["error_file_id", "Errors"]]) {
      if (!b[key]) continue;
      actions.append(h("button", { type: "button", class: "small", "data-download": key,
        onclick: () => download(`/v1/files/${b[key]}/content`, `${b.id}-${label.toLowerCase()}.jsonl`)
          .catch((err) => { errorLine.textContent = err.message; }) }, `Download ${label.toLowerCase()}`));
    }
    return h("tr", { "data-batch-id": b.id, "data-key": b.id },
      h("td", {}, h("code", {}, b.id), h("div", { class: "muted hide-narrow" }, b.endpoint)),
      h("td", {}, chip(b.status, TONE[b.status])),
      h("td", { style: "min-width:9rem" }, progress,
        h("span", { class: "muted" }, `${done} / ${counts.total}${counts.failed ? ` (${counts.failed} failed)` : ""}`)),
      h("td", { class: "hide-narrow" }, when(b.created_at)),
      h("td", {}, actions));
  });
  return table(["Batch", "Status", "Progress", ["Created", "hide-narrow"], "Actions"], rows,
    { empty: "No batches yet: upload a JSONL file above." });
}
