// Small DOM and formatting helpers. Every piece of data goes into the page as text, never as HTML.

import { SignedOut } from "./api.js";

/** h("a", {href: "#/x", class: "y"}, "text", child, ...) */
export function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (name === "dataset") Object.assign(node.dataset, value);
    else node.setAttribute(name, value === true ? "" : value);
  }
  node.append(...children.flat().filter((c) => c !== undefined && c !== null && c !== false));
  return node;
}

/** A table; a heading written "#Size" is a numeric (right-aligned) column. */
export function table(headings, rows, empty = "Nothing yet.", attrs = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  const th = (t) => (t.startsWith("#") && t.length > 1 ? h("th", { class: "num" }, t.slice(1)) : h("th", {}, t));
  return h("table", attrs,
    h("thead", {}, h("tr", {}, headings.map(th))),
    h("tbody", {}, rows));
}

export const badge = (state) => h("span", { class: `badge ${state}` }, state);

export function ago(seconds) {
  if (seconds === null || seconds === undefined) return "—";
  if (seconds < 60) return `${Math.max(0, Math.round(seconds))} s ago`;
  if (seconds < 3600) return `${Math.round(seconds / 60)} min ago`;
  if (seconds < 86400) return `${Math.round(seconds / 3600)} h ago`;
  return `${Math.round(seconds / 86400)} d ago`;
}

export const since = (iso) => (iso ? (Date.now() - Date.parse(iso)) / 1000 : null);

/** A time cell: "3 min ago", with the exact local time on hover. */
export const when = (iso) =>
  h("time", { datetime: iso, title: iso ? new Date(iso).toLocaleString() : "" }, ago(since(iso)));

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) {
    n /= 1024;
    i += 1;
  }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

export function number(x, digits = 4) {
  if (x === null || x === undefined || Number.isNaN(x)) return "—";
  if (Number.isInteger(x)) return String(x);
  return Math.abs(x) >= 1e4 || Math.abs(x) < 1e-3 ? x.toExponential(2) : x.toPrecision(digits);
}

/** Run `task` now and then every `ms` (never overlapping, skipped while the tab is hidden). */
export function every(ms, task) {
  let timer = null;
  let stopped = false;
  const tick = async () => {
    if (stopped) return;
    if (!document.hidden) {
      try {
        await task();
      } catch (error) {
        if (!stopped) showError(error);
      }
    }
    if (!stopped) timer = setTimeout(tick, ms);
  };
  tick();
  return () => {
    stopped = true;
    clearTimeout(timer);
  };
}

export function showError(error) {
  const banner = document.getElementById("error");
  if (!error || error instanceof SignedOut) {
    banner.hidden = true;
    return;
  }
  banner.textContent = error.message ?? String(error);
  banner.hidden = false;
}

export const clearError = () => showError(null);

export const shortId = (id) => (id.length > 14 ? `${id.slice(0, 8)}…` : id);

/** "3f2a9c1e…:train:0" for a run id "<session uuid>:train:<n>". */
export function runLabel(id) {
  const match = /^(.*)(:train:\d+)$/.exec(id);
  return match ? `${shortId(match[1])}${match[2]}` : shortId(id);
}

export const loraText = (lora) =>
  `rank ${lora.rank} · ${["mlp", "attn", "unembed"].filter((p) => lora[`train_${p}`]).join(" + ")}`;
