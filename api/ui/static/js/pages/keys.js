// Keys and users (admin only; the API refuses every /admin call to anyone else): list, create (the secret is
// shown once), revoke, and each key's use of its limits in the current minute and day.
import { api } from "../api.js";
import { clearErrors, every, field, h, refreshRegion, showError, table, when } from "../dom.js";

const ROLES = ["client", "admin", "monitor", "worker"];

export function render(root, { signal }) {
  const keys = h("div", { id: "key-list" });
  const users = h("div", { id: "user-list" });
  const errorLine = h("p", { class: "error", role: "alert" });
  const secret = h("div", { id: "new-secret", "aria-live": "polite" });

  async function refresh() {
    try {
      const [keyList, userList] = await Promise.all([api("/admin/keys", { signal }), api("/admin/users", { signal })]);
      errorLine.textContent = "";
      refreshRegion(keys, keyTable(keyList.data, refresh, errorLine));
      refreshRegion(users, userTable(userList.data, refresh, errorLine));
    } catch (err) {
      if (err.name !== "AbortError") errorLine.textContent = err.message;
    }
  }

  root.append(h("h1", {}, "Keys & users"), errorLine,
    h("div", { class: "grid cols-even" }, keyForm(secret, refresh), userForm(refresh)), secret,
    h("section", { class: "panel", "aria-labelledby": "keys-title", style: "margin-top:1rem" },
      h("h2", { id: "keys-title" }, "API keys"), keys),
    h("section", { class: "panel", "aria-labelledby": "users-title", style: "margin-top:1rem" },
      h("h2", { id: "users-title" }, "Users"), users));
  every(5000, refresh, signal);
}

function roleSelect(id) {
  return h("select", { id }, ROLES.map((role) => h("option", { value: role }, role)));
}

function keyForm(secret, refresh) {
  const name = h("input", { id: "key-name", autocomplete: "off", placeholder: "e.g. analytics team" });
  const role = roleSelect("key-role");
  const form = h("form", { class: "panel", "aria-labelledby": "new-key-title" },
    h("h2", { id: "new-key-title" }, "New API key"), field("Name", name), field("Role", role),
    h("div", { class: "row end" }, h("button", { type: "submit", class: "primary", id: "key-create" }, "Create key")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    try {
      const created = await api("/admin/keys", { method: "POST", body: { name: name.value, role: role.value } });
      const value = h("code", { id: "new-secret-value" }, created.key);
      secret.replaceChildren(h("div", { class: "panel secret", style: "margin-top:1rem" },
        h("strong", {}, `Key “${created.name}” (${created.role}) — copy it now, it is shown only once: `), value,
        h("div", { class: "row end" }, h("button", { type: "button", class: "small", onclick: (e) => {
          navigator.clipboard.writeText(created.key).then(() => { e.target.textContent = "Copied ✓"; },
            () => { e.target.textContent = "Select the key to copy it"; });
        } }, "Copy"), h("button", { type: "button", class: "small ghost",
          onclick: () => secret.replaceChildren() }, "Done"))));
      form.reset();
      await refresh();
    } catch (err) {
      showError(err.param === "role" ? role : name, err.message);
    }
  });
  return form;
}

function userForm(refresh) {
  const email = h("input", { id: "user-email", type: "email", autocomplete: "off" });
  const password = h("input", { id: "user-password", type: "password", autocomplete: "new-password" });
  const role = roleSelect("user-role");
  const form = h("form", { class: "panel", "aria-labelledby": "new-user-title" },
    h("h2", { id: "new-user-title" }, "New user"), field("Email", email), field("Password", password),
    field("Role", role),
    h("div", { class: "row end" }, h("button", { type: "submit", class: "primary" }, "Add user")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearErrors(form);
    try {
      await api("/admin/users", { method: "POST",
        body: { email: email.value, password: password.value, role: role.value } });
      form.reset();
      await refresh();
    } catch (err) {
      showError(/password/i.test(err.message) ? password : email, err.message);
    }
  });
  return form;
}

function usage(used, limit) {
  return limit ? `${used} / ${limit}` : `${used} / ∞`;
}

function keyTable(keys, refresh, errorLine) {
  const rows = keys.map((k) => h("tr", { "data-key-id": k.id, "data-key": k.id },
    h("td", {}, k.name, h("div", { class: "muted" }, h("code", {}, k.id))),
    h("td", {}, k.role),
    h("td", { class: "num" }, usage(k.usage.minute_requests, k.effective_limits.requests_per_minute)),
    h("td", { class: "num" }, usage(k.usage.minute_tokens, k.effective_limits.tokens_per_minute)),
    h("td", { class: "num" }, usage(k.usage.day_requests, k.effective_limits.requests_per_day)),
    h("td", { class: "hide-narrow" }, when(k.created_at)),
    h("td", {}, h("button", { type: "button", class: "small danger", onclick: async () => {
      if (!window.confirm(`Revoke the key “${k.name}”? Clients using it stop working at once.`)) return;
      await api(`/admin/keys/${k.id}`, { method: "DELETE" }).catch((err) => { errorLine.textContent = err.message; });
      await refresh();
    } }, "Revoke"))));
  return table(["Key", "Role", ["Requests this minute", "num"], ["Tokens this minute", "num"],
    ["Requests today", "num"], ["Created", "hide-narrow"], ""], rows,
  { empty: "No API keys yet (keys from INFERQ_API_KEYS are not listed here)." });
}

function userTable(users, refresh, errorLine) {
  const rows = users.map((u) => h("tr", { "data-email": u.email, "data-key": u.email },
    h("td", {}, u.email), h("td", {}, u.role), h("td", { class: "hide-narrow" }, when(u.created_at)),
    h("td", {}, h("button", { type: "button", class: "small danger", onclick: async () => {
      if (!window.confirm(`Remove the user ${u.email}?`)) return;
      await api(`/admin/users/${encodeURIComponent(u.email)}`, { method: "DELETE" })
        .catch((err) => { errorLine.textContent = err.message; });
      await refresh();
    } }, "Remove"))));
  return table(["Email", "Role", ["Created", "hide-narrow"], ""], rows, { empty: "No users yet." });
}
