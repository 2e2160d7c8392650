// A training run: its summary, one chart per metric (updated live), and its checkpoints.

import { ApiError, del, get } from "./api.js";
import { badge, bytes, every, h, loraText, number, showError, table, when } from "./ui.js";

const KINDS = { ForwardBackward: "forward_backward", OptimStep: "optim_step", Forward: "forward" };
const COLORS = { forward_backward: "#2563eb", optim_step: "#d97706", forward: "#059669" };
const METRICS_MS = 1500;
const SUMMARY_MS = 4000;

export function runPage(view, runId) {
  const runPath = `/training_runs/${encodeURIComponent(runId)}`;
  const summary = h("div", { class: "run-summary" });
  const charts = h("div", { class: "charts", id: "charts" }, h("p", { class: "empty" }, "No metrics yet."));
  const checkpoints = h("div", { id: "checkpoints" });
  view.replaceChildren(
    h("p", { class: "crumbs" }, h("a", { href: "#/runs" }, "Training runs"), " / ",
      h("span", { class: "mono" }, runId)),
    summary,
    h("h2", {}, "Metrics ", h("span", { class: "hint" }, "by optimizer step, updated live")),
    charts,
    h("h2", {}, "Checkpoints"),
    checkpoints);

  const series = new Map(); // "kind · metric" -> {card, chart, points}
  let lastSeq = -1;
  let optimSteps = 0;

  function seriesFor(kind, metric) {
    const key = `${kind} · ${metric}`;
    if (series.has(key)) return series.get(key);
    if (!series.size) charts.replaceChildren();
    const canvas = h("canvas", { "aria-label": `${key} by step`, role: "img" });
    const latest = h("span", { class: "latest" });
    const card = h("figure", { class: "chart-card", dataset: { series: key, points: 0 } },
      h("figcaption", {}, h("span", { class: `kind ${kind}` }, kind), h("span", { class: "metric" }, metric), latest),
      h("div", { class: "chart-box" }, canvas));
    // The derived per-token loss leads; the rest follow in the order they first appear.
    if (metric === "loss / token") charts.prepend(card);
    else charts.append(card);
    const points = [];
    const color = COLORS[kind] ?? "#6b7280";
    const chart = new window.Chart(canvas, {
      type: "line",
      data: { datasets: [{ label: key, data: points, borderColor: color, backgroundColor: color,
        borderWidth: 1.5, pointRadius: 2, tension: 0 }] },
      options: {
        animation: false, responsive: true, maintainAspectRatio: false, parsing: false, normalized: true,
        interaction: { mode: "nearest", axis: "x", intersect: false },
        scales: {
          x: { type: "linear", bounds: "data", title: { display: true, text: "step" }, ticks: { precision: 0 } },
          y: { type: "linear" },
        },
        plugins: {
          legend: { display: false },
          tooltip: { callbacks: {
            title: (items) => `step ${items[0].raw.x} · seq_id ${items[0].raw.seq}`,
            label: (item) => `${metric}: ${number(item.raw.y)}`,
          } },
        },
      },
    });
    const entry = { card, chart, points, latest };
    series.set(key, entry);
    return entry;
  }

  function ingest(row) {
    const kind = KINDS[row.request_type] ?? row.request_type;
    // A forward_backward counts toward the optimizer step that follows it.
    if (row.request_type === "OptimStep") optimSteps += 1;
    const x = row.request_type === "OptimStep" ? optimSteps : optimSteps + 1;
    const values = Object.entries(row.metrics);
    const { "loss:sum": loss, "ntokens:sum": ntokens } = row.metrics;
    if (loss !== undefined && ntokens) values.unshift(["loss / token", loss / ntokens]);
    const touched = new Set();
    for (const [metric, y] of values) {
      if (typeof y !== "number") continue;
      const entry = seriesFor(kind, metric);
      entry.points.push({ x, y, seq: row.seq_id });
      touched.add(entry);
    }
    lastSeq = Math.max(lastSeq, row.seq_id);
    return touched;
  }

  async function pollMetrics() {
    let metrics;
    try {
      ({ metrics } = await get(`${runPath}/metrics?after_seq_id=${lastSeq}`));
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) return; // pollSummary says so
      throw error;
    }
    const touched = new Set();
    for (const row of metrics) for (const entry of ingest(row)) touched.add(entry);
    for (const entry of touched) {
      entry.chart.data.datasets[0].pointRadius = entry.points.length > 80 ? 0 : 2;
      entry.chart.update("none");
      entry.card.dataset.points = entry.points.length;
      entry.latest.textContent = number(entry.points.at(-1).y);
    }
  }

  async function pollSummary() {
    let run;
    try {
      run = await get(`/dashboard/runs/${encodeURIComponent(runId)}`);
    } catch (error) {
      if (error instanceof ApiError && error.status === 404) {
        stop();
        view.replaceChildren(h("h1", {}, "Training run not found"),
          h("p", { class: "empty", id: "not-found" }, `This key has no training run ${runId}.`),
          h("p", {}, h("a", { href: "#/runs" }, "All training runs")));
        return;
      }
      throw error;
    }
    const field = (label, value) =>
      h("div", { class: "fact" }, h("div", { class: "label" }, label), h("div", {}, value));
    summary.replaceChildren(
      h("h1", {}, "Training run ", badge(run.status)),
      h("div", { class: "facts" },
        field("Base model", run.base_model),
        field("LoRA", loraText(run.lora)),
        field("Seed", run.lora.seed ?? "—"),
        field("Steps", h("span", { id: "run-steps" }, run.steps)),
        field("forward_backward calls", run.forward_backward),
        field("Loss / token (last)", number(run.last_loss)),
        field("Created", when(run.created_at)),
        field("Last activity", when(run.last_activity))));
    await showCheckpoints();
  }

  async function showCheckpoints() {
    const { checkpoints: list } = await get(`${runPath}/checkpoints`);
    list.reverse(); // newest first
    const rows = list.map((c) => {
      const ckptPath = `${runPath}/checkpoints/${c.checkpoint_id.split("/").map(encodeURIComponent).join("/")}`;
      const download = async () => {
        const { url } = await get(`${ckptPath}/archive?redirect=false`);
        const link = h("a", { href: url, download: "" }); // a signed, expiring link: no key in it
        document.body.append(link);
        link.click();
        link.remove();
      };
      const remove = async () => {
        if (!confirm(`Delete ${c.tinker_path}? This cannot be undone.`)) return;
        await del(ckptPath);
        await showCheckpoints();
      };
      const act = (label, fn, cls = "") => h("button", { type: "button", class: `small ${cls}`,
        onclick: () => fn().catch(showError) }, label);
      return h("tr", { dataset: { checkpoint: c.tinker_path } },
        h("td", { class: "mono", title: c.tinker_path }, c.checkpoint_id),
        h("td", {}, c.checkpoint_type),
        h("td", { class: "num" }, bytes(c.size_bytes)),
        h("td", {}, when(c.time)),
        h("td", {}, c.expires_at ? new Date(c.expires_at).toLocaleString() : "never"),
        h("td", { class: "actions" },
          act("Download", download),
          h("a", { class: "button small", href: `#/playground?model=${encodeURIComponent(c.tinker_path)}` }, "Sample"),
          act("Delete", remove, "danger")));
    });
    checkpoints.replaceChildren(table(["Checkpoint", "Type", "#Size", "Saved", "Expires", ""], rows,
      "No checkpoints yet: save_state or save_weights_for_sampler makes one."));
  }

  const stops = [every(METRICS_MS, pollMetrics), every(SUMMARY_MS, pollSummary)];
  function stop() {
    for (const s of stops) s();
    for (const { chart } of series.values()) chart.destroy();
    series.clear();
  }
  return stop;
}
