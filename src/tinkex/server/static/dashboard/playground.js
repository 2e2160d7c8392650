// The playground: sample from a base model or any checkpoint, with the sampling parameters as fields.
// It does what an SDK's SamplingClient does: create_session, create_sampling_session, asample, then
// retrieve_future (as JSON) until the result is there. The server's tokenizer turns text into tokens.

import { get, post } from "./api.js";
import { clearError, h, number, runLabel, showError, table } from "./ui.js";

function checkpointLabel(path) {
  const match = /^tinker:\/\/([^/]+)\/(.+)$/.exec(path);
  return match ? `${runLabel(match[1])} / ${match[2]}` : path;
}

async function modelOptions(select, preselected) {
  const [{ supported_models: models }, { checkpoints }] = await Promise.all([
    get("/get_server_capabilities"), get("/checkpoints?limit=500")]);
  const option = (value, label) => h("option", { value, title: value.slice(value.indexOf(":") + 1) }, label);
  const groups = [h("optgroup", { label: "Base models" },
    models.map((m) => option(`base:${m.model_name}`, m.model_name)))];
  const paths = checkpoints.map((c) => c.tinker_path);
  if (preselected?.startsWith("tinker://") && !paths.includes(preselected)) paths.unshift(preselected);
  if (paths.length) {
    groups.unshift(h("optgroup", { label: "Checkpoints (newest first)" },
      paths.map((p) => option(`path:${p}`, checkpointLabel(p)))));
  }
  select.replaceChildren(...groups);
  if (preselected) select.value = `${preselected.startsWith("tinker://") ? "path" : "base"}:${preselected}`;
  if (!select.value) select.selectedIndex = 0;
}

function field(label, name, attrs) {
  return h("label", {}, label, h("input", { name, id: `pg-${name}`, ...attrs }));
}

export function playgroundPage(view, preselected) {
  let alive = true;
  const select = h("select", { name: "model", id: "pg-model", required: true });
  const button = h("button", { type: "submit", id: "pg-sample" }, "Sample");
  const status = h("span", { class: "hint", id: "pg-status" });
  const form = h("form", { id: "playground-form", class: "card playground", method: "post" },
    h("label", { class: "wide" }, "Model", select),
    h("label", { class: "wide" }, "Prompt",
      h("textarea", { name: "prompt", id: "pg-prompt", rows: 4, required: true })),
    h("div", { class: "params" },
      field("max_tokens", "max_tokens", { type: "number", min: 1, max: 8192, value: 32, required: true }),
      field("temperature", "temperature", { type: "number", min: 0, step: "any", value: 1 }),
      field("top_p", "top_p", { type: "number", min: 0, max: 1, step: "any", value: 1 }),
      field("top_k (-1: all)", "top_k", { type: "number", min: -1, step: 1, value: -1 }),
      field("seed", "seed", { type: "number", step: 1, min: 0, placeholder: "random" }),
      field("num_samples", "num_samples", { type: "number", min: 1, max: 16, value: 1, required: true })),
    h("label", { class: "wide" }, "stop strings, one per line (none: stop at the end-of-sequence token)",
      h("textarea", { name: "stop", id: "pg-stop", rows: 2 })),
    h("div", { class: "submit" }, button, status));
  const output = h("div", { id: "pg-output" });
  view.replaceChildren(h("h1", {}, "Playground"), form, output);
  modelOptions(select, preselected).catch(showError);

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearError();
    button.disabled = true;
    status.textContent = "Sampling…";
    const started = performance.now();
    try {
      const samples = await sample(new FormData(form));
      if (!alive) return;
      output.replaceChildren(...samples);
      status.textContent = `Done in ${((performance.now() - started) / 1000).toFixed(1)} s.`;
    } catch (error) {
      status.textContent = "";
      showError(error);
    } finally {
      button.disabled = false;
    }
  });
  return () => {
    alive = false;
  };
}

async function sample(data) {
  const choice = data.get("model");
  const model = choice.slice(choice.indexOf(":") + 1);
  const target = choice.startsWith("path:") ? { model_path: model } : { base_model: model };
  const promptText = data.get("prompt");
  const { tokens } = await post("/dashboard/tokenize", { ...target, text: promptText });
  if (!tokens.length) throw new Error("The prompt has no tokens.");
  const params = { max_tokens: Number(data.get("max_tokens")), temperature: Number(data.get("temperature")),
    top_p: Number(data.get("top_p")), top_k: Number(data.get("top_k")) };
  if (data.get("seed") !== "") params.seed = Number(data.get("seed"));
  const stop = data.get("stop").split("\n").filter((s) => s !== "");
  if (stop.length) params.stop = stop;

  const { session_id: sessionId } = await post("/create_session", {
    tags: ["dashboard"], display_name: "dashboard playground" });
  try {
    const { sampling_session_id: samplerId } = await post("/create_sampling_session", {
      session_id: sessionId, sampling_session_seq_id: 0, ...target });
    const future = await post("/asample", {
      sampling_session_id: samplerId, seq_id: 0, num_samples: Number(data.get("num_samples")),
      prompt: { chunks: [{ type: "encoded_text", tokens }] }, sampling_params: params });
    const result = await retrieve(future.request_id);
    return Promise.all(result.sequences.map(async (seq, i) => {
      const { text, pieces } = await post("/dashboard/detokenize", { ...target, tokens: seq.tokens });
      return sampleCard(i, promptText, text, pieces, seq);
    }));
  } finally {
    post(`/sessions/${encodeURIComponent(sessionId)}/finish`, { reason: { type: "success" } }).catch(() => {});
  }
}

async function retrieve(requestId) {
  for (;;) {
    const answer = await post("/retrieve_future", { request_id: requestId });
    if (answer.type === "try_again") continue; // the server long-polls, so this does not spin
    if (answer.error) throw new Error(`Sampling failed: ${answer.error}`);
    return answer;
  }
}

const visible = (piece) => piece.replaceAll(" ", "·").replaceAll("\n", "↵\n").replaceAll("\t", "→");

function sampleCard(i, promptText, text, pieces, seq) {
  const logprobs = seq.logprobs ?? [];
  const total = logprobs.reduce((a, b) => a + b, 0);
  const rows = seq.tokens.map((token, j) => h("tr", {},
    h("td", { class: "num" }, j),
    h("td", { class: "num mono" }, token),
    h("td", {}, h("span", { class: "piece" }, visible(pieces[j] ?? ""))),
    h("td", { class: "num" }, number(logprobs[j])),
    h("td", { class: "num" }, logprobs[j] === undefined ? "—" : `${(100 * Math.exp(logprobs[j])).toFixed(1)} %`)));
  return h("article", { class: "card sample", dataset: { sample: i } },
    h("header", {}, h("strong", {}, `Sample ${i + 1}`),
      h("span", { class: "hint" }, ` · ${seq.tokens.length} tokens · stop: ${seq.stop_reason} · ` +
        `sum logprob ${number(total)}`)),
    h("p", { class: "sample-text" }, h("span", { class: "prompt" }, promptText),
      h("span", { class: "completion" }, text)),
    h("details", { open: seq.tokens.length <= 64 }, h("summary", {}, "Tokens and logprobs"),
      table(["##", "#id", "text", "#logprob", "#p"], rows, "No tokens.", { class: "tokens" })));
}
