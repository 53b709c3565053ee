// The console's shell: who is signed in (and so which pages show), the hash router, the connection banner.
import { api, ApiError, credential, onConnectionChange } from "./api.js";
import { h } from "./dom.js";
import * as playground from "./pages/playground.js";
import * as cluster from "./pages/cluster.js";
import * as batches from "./pages/batches.js";
import * as deployments from "./pages/deployments.js";
import * as keys from "./pages/keys.js";

// Which roles may open which page: the same split as the API's route policy (docs/security.md), which refuses
// the calls anyway; hiding the page only spares the user a page of refusals.
const PAGES = {
  playground: { module: playground, title: "Playground", roles: ["admin", "client"] },
  cluster: { module: cluster, title: "Cluster", roles: ["admin", "monitor"] },
  batches: { module: batches, title: "Batches", roles: ["admin", "client"] },
  deployments: { module: deployments, title: "Deployments", roles: ["admin", "monitor", "client"] },
  keys: { module: keys, title: "Keys & users", roles: ["admin"] },
};

const main = document.getElementById("main");
let me = null;
let leave = null; // aborts the current page's timers and streams

function allowed(name) {
  return me !== null && PAGES[name].roles.includes(me.role);
}

function defaultPage() {
  return Object.keys(PAGES).find(allowed) || "playground";
}

function render() {
  const requested = location.hash.replace(/^#\/?/, "").split("/")[0];
  const name = PAGES[requested] ? requested : defaultPage();
  leave?.abort();
  leave = new AbortController();
  for (const item of document.querySelectorAll("#nav li")) {
    item.hidden = !allowed(item.dataset.page);
    const link = item.querySelector("a");
    if (item.dataset.page === name) link.setAttribute("aria-current", "page");
    else link.removeAttribute("aria-current");
  }
  document.title = `${PAGES[name].title} · inferq console`;
  main.replaceChildren();
  if (!allowed(name)) {
    main.append(h("section", { class: "panel", "aria-labelledby": "denied" },
      h("h1", { id: "denied" }, PAGES[name].title),
      h("p", {}, `The ${me?.role ?? "current"} role cannot use this page. Sign in with another key to see it.`)));
    return;
  }
  PAGES[name].module.render(main, { signal: leave.signal, me });
}

// Shows who is signed in and the pages their role may open. Called with the user the caller already fetched, so
// the name and the pages change together, before the sign-in dialog closes (never the previous user's name
// next to the new user's pages).
function showSignedIn(user) {
  me = user;
  document.getElementById("who").hidden = !me.auth;
  document.getElementById("who-name").textContent = `${me.name} · ${me.role}`;
  render();
}

async function whoAmI() {
  let user;
  try {
    user = await api("/users/me");
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      credential.clear();
      me = null;
      return askToSignIn();
    }
    throw err;
  }
  showSignedIn(user);
}

function askToSignIn() {
  const dialog = document.getElementById("login");
  if (!dialog.open) dialog.showModal();
  document.getElementById("login-key").focus();
}

async function signIn(event) {
  event.preventDefault();
  const form = event.target;
  const error = document.getElementById("login-error");
  error.textContent = "";
  const key = form.key.value.trim();
  let user;
  try {
    if (key) {
      credential.set(key);
    } else if (form.email.value && form.password.value) {
      const { token } = await api("/users/me/token", {
        method: "POST", body: { email: form.email.value, password: form.password.value },
      });
      credential.set(token, { login: true });
    } else {
      error.textContent = "Enter an API key, or an email and password.";
      return;
    }
    user = await api("/users/me");
  } catch (err) {
    credential.clear();
    error.textContent = err.message;
    return;
  }
  form.reset();
  showSignedIn(user);
  document.getElementById("login").close();
}

async function signOut() {
  if (credential.isLogin()) {
    // revoke a login token on the server too (API keys stay valid; they are only forgotten here)
    await api("/users/me/token", { method: "DELETE" }).catch(() => {});
  }
  credential.clear();
  me = null;
  leave?.abort();
  main.replaceChildren();
  for (const item of document.querySelectorAll("#nav li")) item.hidden = true;
  document.getElementById("who").hidden = true;
  document.getElementById("who-name").textContent = "";
  askToSignIn();
}

function showBanner(isOffline) {
  const banner = document.getElementById("banner");
  banner.hidden = !isOffline;
  banner.textContent = isOffline ? "Connection to the API lost. Retrying…" : "";
  if (!isOffline && me === null) whoAmI().catch(() => {});
}

document.getElementById("login-form").addEventListener("submit", signIn);
document.getElementById("login").addEventListener("cancel", (event) => event.preventDefault());
document.getElementById("sign-out").addEventListener("click", signOut);
window.addEventListener("hashchange", () => me && render());
// "Skip to content" moves focus only. Followed as a link it would set the hash to #main, which the router takes
// for a page: it rendered the default page afresh, dropping what the user had typed (and leaving the page they
// were on); a keyboard user then sent from a page whose models had not loaded yet.
document.querySelector("a.skip").addEventListener("click", (event) => {
  event.preventDefault();
  main.focus();
});
onConnectionChange(showBanner);
whoAmI().catch(() => {}); // offline at load: the banner shows, and whoAmI runs again once the API answers
