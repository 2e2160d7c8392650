// The dashboard shell: sign-in, hash routes, and the two list pages (sessions, training runs).
// Routes: #/sessions  #/runs  #/runs/<run id>  #/playground?model=<tinker path or base model>

import { SignedOut, api, apiKey, forgetApiKey, get, setApiKey, whenSignedOut } from "./api.js";
import { runPage } from "./run.js";
import { playgroundPage } from "./playground.js";
import { ago, badge, clearError, every, h, loraText, number, runLabel, shortId, table, when } from "./ui.js";

const view = document.getElementById("view");
const keyForm = document.getElementById("key-form");
let stopPage = () => {};

const newest = (shown, total) => (total > shown ? h("p", { class: "hint" }, `The ${shown} newest of ${total}.`) : "");

function sessionsPage() {
  const body = h("div", { id: "sessions" });
  view.replaceChildren(h("h1", {}, "Sessions"), h("p", { class: "hint" },
    "Clients send a heartbeat every 10 s; a session is live while its last one is under 30 s old."), body);
  return every(2000, async () => {
    const { sessions, total } = await get("/dashboard/sessions");
    const rows = sessions.map((s) => h("tr", { dataset: { session: s.session_id } },
      h("td", {}, h("span", { class: "mono", title: s.session_id }, shortId(s.session_id)),
        s.display_name ? h("div", { class: "sub" }, s.display_name) : null),
      h("td", {}, badge(s.state)),
      h("td", { class: "heartbeat", dataset: { age: s.heartbeat_age_s } }, ago(s.heartbeat_age_s)),
      h("td", { class: "num" }, s.training_runs),
      h("td", { class: "num" }, s.samplers),
      h("td", {}, s.tags.map((t) => h("span", { class: "tag" }, t))),
      h("td", {}, when(s.created_at))));
    body.replaceChildren(table(["Session", "State", "Last heartbeat", "#Runs", "#Samplers", "Tags", "Created"], rows,
      "No sessions yet: create a ServiceClient against this server."), newest(sessions.length, total));
  });
}

function runsPage() {
  const body = h("div", { id: "runs" });
  view.replaceChildren(h("h1", {}, "Training runs"), body);
  return every(3000, async () => {
    const { training_runs: runs, total } = await get("/dashboard/runs");
    const rows = runs.map((r) => h("tr", { dataset: { run: r.training_run_id } },
      h("td", {}, h("a", { href: `#/runs/${encodeURIComponent(r.training_run_id)}`, class: "mono",
        title: r.training_run_id }, runLabel(r.training_run_id))),
      h("td", {}, r.base_model),
      h("td", {}, loraText(r.lora)),
      h("td", { class: "num steps" }, r.steps),
      h("td", { class: "num" }, number(r.last_loss)),
      h("td", {}, badge(r.status)),
      h("td", {}, when(r.last_activity))));
    body.replaceChildren(table(["Run", "Base model", "LoRA", "#Steps", "#Loss / token", "Status", "Last activity"],
      rows, "No training runs yet."), newest(runs.length, total));
  });
}

function route() {
  stopPage();
  stopPage = () => {};
  clearError();
  if (!apiKey()) return signIn();
  keyForm.hidden = true;
  document.getElementById("nav").hidden = false;
  document.getElementById("who").hidden = false;
  const [path, query] = location.hash.replace(/^#\/?/, "").split("?");
  const [page, ...rest] = path.split("/");
  for (const link of document.querySelectorAll("[data-nav]")) {
    link.classList.toggle("active", link.dataset.nav === (page || "sessions"));
  }
  const params = new URLSearchParams(query ?? "");
  if (page === "runs" && rest.length) stopPage = runPage(view, decodeURIComponent(rest.join("/")));
  else if (page === "runs") stopPage = runsPage();
  else if (page === "playground") stopPage = playgroundPage(view, params.get("model"));
  else stopPage = sessionsPage();
}

function signIn(message) {
  stopPage();
  stopPage = () => {};
  view.replaceChildren();
  clearError();
  document.getElementById("nav").hidden = true;
  document.getElementById("who").hidden = true;
  const error = document.getElementById("key-error");
  error.textContent = message ?? "";
  error.hidden = !message;
  keyForm.hidden = false;
  document.getElementById("key-input").focus();
}

keyForm.addEventListener("submit", async (event) => {
  event.preventDefault();
  const key = document.getElementById("key-input").value.trim();
  try {
    const me = await api("GET", "/dashboard/whoami", undefined, key);
    setApiKey(key, document.getElementById("key-remember").checked);
    keyForm.reset();
    showTenant(me.tenant);
    route();
  } catch (error) {
    if (!(error instanceof SignedOut)) signIn(error.message);
  }
});

function showTenant(tenant) {
  document.getElementById("tenant").textContent = `tenant ${tenant}`;
}

document.getElementById("sign-out").addEventListener("click", () => {
  forgetApiKey();
  signIn();
});

whenSignedOut(signIn);
window.addEventListener("hashchange", route);
if (apiKey()) get("/dashboard/whoami").then((me) => showTenant(me.tenant), () => {});
route();
