// Deployments: deploy a model through a node agent (its own machine, or a host over SSH), watch the status
// (polled), stream a deployment's logs live (the SSE logs route), stop it.
import { api, ApiError, sse } from "../api.js";
import { chip, clearErrors, every, field, h, refreshRegion, showError, table, when } from "../dom.js";

const TONE = { active: "ok", failed: "bad", stopped: "", queued: "warn", starting: "warn", stopping: "warn" };
const MAX_LOG_LINES = 2000;

export function render(root, { signal, me }) {
  const canChange = me.role !== "monitor";
  const list = h("div", { id: "deployment-list" });
  const listError = h("p", { class: "error", role: "alert" });
  const logTitle = h("h2", { id: "logs-title" }, "Logs");
  const log = h("pre", { class: "log", id: "deployment-log", tabindex: "0", "aria-labelledby": "logs-title",
    "aria-live": "off" }, "Choose a deployment's “Logs” to follow it here.");
  const meta = h("p", { class: "muted", id: "deployment-meta" });
  let following = null; // {id, controller}

  root.append(h("h1", {}, "Deployments"),
    canChange ? deployForm(() => refresh()) : null,
    h("div", { class: "grid cols-even", style: "margin-top:1rem" },
      h("section", { class: "panel", "aria-labelledby": "deployments-title" },
        h("h2", { id: "deployments-title" }, "Deployments"), listError, list),
      h("section", { class: "panel", "aria-labelledby": "logs-title" }, logTitle, meta, log)));

  async function refresh() {
    try {
      const { data } = await api("/api/v1/deployments", { signal });
      listError.textContent = "";
      refreshRegion(list, deploymentTable(data));
    } catch (err) {
      if (err.name !== "AbortError") listError.textContent = err.message;
    }
  }
  every(2000, refresh, signal);

  function deploymentTable(deployments) {
    const rows = deployments.map((d) => h("tr", { "data-deployment-id": d.deployment_id,
      "data-key": d.deployment_id, class: following?.id === d.deployment_id ? "selected" : null },
    h("td", {}, d.model_id, h("div", { class: "muted" }, h("code", {}, d.deployment_id))),
    h("td", {}, chip(d.status, TONE[d.status]), d.error ? h("div", { class: "error" }, d.error) : null),
    h("td", { class: "hide-narrow" }, d.created_at ? when(Date.parse(`${d.created_at}Z`) / 1000) : "—"),
    h("td", {}, h("div", { class: "row" },
      h("button", { type: "button", class: "small", onclick: () => follow(d) }, "Logs"),
      canChange && !["stopped", "failed"].includes(d.status)
        ? h("button", { type: "button", class: "small danger", onclick: (event) => stop(d, event.target) }, "Stop")
        : null))));
    return table(["Model", "Status", ["Created", "hide-narrow"], "Actions"], rows,
      { empty: "No deployments yet." });
  }

  async function stop(deployment, button) {
    button.disabled = true;
    try {
      await api(`/api/v1/deployments/${deployment.deployment_id}`, { method: "DELETE" });
    } catch (err) {
      listError.textContent = err.message;
    }
    await refresh();
  }

  async function follow(deployment) {
    following?.controller.abort();
    const controller = new AbortController();
    signal.addEventListener("abort", () => controller.abort());
    following = { id: deployment.deployment_id, controller };
    logTitle.textContent = `Logs: ${deployment.model_id}`;
    log.textContent = "";
    meta.textContent = "Connecting…";
    await refresh();
    const lines = [];
    try {
      await sse(`/api/v1/deployments/${deployment.deployment_id}/logs/stream?timestamps=true`, {
        signal: controller.signal, onEvent: (name, data) => {
          const event = JSON.parse(data);
          if (name === "deployment_info") meta.textContent = `Status ${event.status}`;
          else if (name === "metadata") {
            meta.textContent = `pid ${event.pid} · ${event.is_running ? "running" : "not running"} · CPU ` +
              `${event.cpu_usage} · memory ${event.memory_usage}`;
          } else if (name === "log") {
            const stick = log.scrollTop + log.clientHeight >= log.scrollHeight - 8;
            lines.push(`${event.timestamp ? `${event.timestamp}  ` : ""}${event.content}`);
            if (lines.length > MAX_LOG_LINES) lines.shift();
            log.textContent = lines.join("\n");
            if (stick) log.scrollTop = log.scrollHeight;
          }
        } });
      meta.textContent += " · stream ended";
    } catch (err) {
      if (err.name !== "AbortError") meta.textContent = `The log stream failed: ${err.message}`;
    }
  }
}

function deployForm(onDeployed) {
  const model = h("input", { id: "deploy-model", required: true, placeholder: "org/name, a packaged name, or a path",
    autocomplete: "off" });
  const apiName = h("input", { id: "deploy-name", placeholder: "optional" });
  const target = h("select", { id: "deploy-target" }, h("option", { value: "local" }, "A node agent's machine"),
    h("option", { value: "ssh" }, "A host over SSH"));
  const host = h("input", { id: "ssh-host", autocomplete: "off" });
  const user = h("input", { id: "ssh-user", autocomplete: "off" });
  const port = h("input", { id: "ssh-port", type: "number", value: "22", min: 1, max: 65535 });
  const password = h("input", { id: "ssh-password", type: "password", autocomplete: "off" });
  const key = h("textarea", { id: "ssh-key", class: "code", rows: 3, spellcheck: false,
    placeholder: "-----BEGIN OPENSSH PRIVATE KEY-----" });
  const ssh = h("fieldset", { class: "grid cols-even", hidden: true },
    h("legend", {}, "SSH (the credentials are used once and never stored)"),
    field("Host", host), field("Username", user), field("Port", port), field("Password", password),
    field("Private key", key));
  const submit = h("button", { type: "submit", class: "primary", id: "deploy-submit" }, "Deploy");
  const note = h("p", { class: "muted", role: "status" });
  const form = h("form", { class: "panel", "aria-labelledby": "deploy-title" },
    h("h2", { id: "deploy-title" }, "Deploy a model"),
    h("div", { class: "grid cols-even" }, field("Model", model), field("Name", apiName), field("Where", target)),
    ssh, h("div", { class: "row end" }, note, submit));
  target.addEventListener("change", () => {
    ssh.hidden = target.value !== "ssh";
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    const body = { model_id: model.value.trim() };
    if (apiName.value.trim()) body.api_name = apiName.value.trim();
    if (target.value === "ssh") {
      body.ssh_config = { host: host.value.trim(), username: user.value.trim(), port: parseInt(port.value, 10) };
      if (password.value) body.ssh_config.password = password.value;
      if (key.value.trim()) body.ssh_config.private_key = key.value;
    }
    submit.disabled = true;
    try {
      const created = await api("/api/v1/deploy", { method: "POST", body });
      note.textContent = `Queued ${created.deployment_id}.`;
      password.value = key.value = "";
      await onDeployed();
    } catch (err) {
      const text = err.message;
      const target = err instanceof ApiError && /ssh|host|username|port/i.test(text) && body.ssh_config
        ? (/host/i.test(text) ? host : /username/i.test(text) ? user : port) : model;
      showError(target, text);
    } finally {
      submit.disabled = false;
    }
  });
  return form;
}
