// The train panel: a corpus (pasted, uploaded or shipped) and the hyperparameters -> POST /train;
// then GET /train/{id}/events followed live: progress, the loss chart, ETA, each epoch's sample,
// Cancel, and on success a button to try the new model.

import { call, eventBatches, getJSON, sendJSON } from "./api.js";
import { LossChart } from "./chart.js";
import { $, $$, el, fmtBytes, fmtDate, fmtLoss, fmtNumber, fmtSeconds, showError } from "./dom.js";
import { requestTry } from "./store.js";

const gateWords = (result) => ({ passed: "passed", held_back: "held the model back", skipped: "skipped" })[result] ?? result;

// The form's fields (the `textgen train` flags): those shown at once, then those under "More settings".
const MAIN_FIELDS = ["embedding_dim", "hidden_dim", "layers", "seq_len", "batch_size", "lr", "epochs", "max_steps"];
const MORE_FIELDS = [
  "vocab_size",
  "dropout",
  "tie_weights",
  "weight_decay",
  "grad_clip",
  "warmup_steps",
  "time_budget_s",
  "patience",
  "val_fraction",
  "seed",
  "threads",
  "precision",
  "device",
];
// Fine-tuning keeps the base model's architecture and tokenizer (lm.train), so these are locked then.
const ARCHITECTURE = ["tokenizer", "vocab_size", "embedding_dim", "hidden_dim", "layers", "dropout", "tie_weights"];
const INTEGER = new Set([
  "vocab_size",
  "embedding_dim",
  "hidden_dim",
  "layers",
  "seq_len",
  "batch_size",
  "warmup_steps",
  "epochs",
  "max_steps",
  "patience",
  "seed",
  "threads",
]);
const CHOICES = { precision: ["auto", "bf16", "fp32"], device: ["auto", "cpu", "cuda"] };
const LABELS = {
  embedding_dim: "Embedding dim",
  hidden_dim: "Hidden units",
  layers: "Layers",
  seq_len: "Sequence length",
  batch_size: "Batch size",
  lr: "Learning rate",
  epochs: "Epochs",
  max_steps: "Max steps",
  vocab_size: "Vocabulary cap (word, bpe)",
  dropout: "Dropout",
  tie_weights: "Tie input and output embeddings",
  weight_decay: "Weight decay",
  grad_clip: "Gradient clip",
  warmup_steps: "Warmup steps",
  time_budget_s: "Time budget (s)",
  patience: "Early-stop patience (epochs)",
  val_fraction: "Validation fraction",
  seed: "Seed",
  threads: "Threads",
  precision: "Precision",
  device: "Device",
};
// Presets fill these fields and reset the others to the server's defaults.
const PRESETS = {
  tiny: { embedding_dim: 32, hidden_dim: 64, layers: 1, seq_len: 64, batch_size: 16, epochs: 5, warmup_steps: 10 },
  small: { embedding_dim: 64, hidden_dim: 256, layers: 2, seq_len: 128, batch_size: 32, epochs: 10, warmup_steps: 50 },
  defaults: {},
};
const FINAL = { done: "succeeded", failed: "failed", cancelled: "cancelled" };

export class TrainPanel {
  constructor(root, { config, store }) {
    this.root = root;
    this.store = store;
    this.limits = config.limits;
    this.defaults = config.training.defaults;
    this.bounds = config.training.bounds;
    this.inputs = {}; // field name -> its input or select
    this.job = null; // the job being followed: its public record
    this.follower = null; // the AbortController of the event stream being read
    this.chart = new LossChart($("#loss-chart", root));
    this.buildForm(config);
    this.bind();
    store.addEventListener("change", () => this.renderBaseModels());
  }

  // ---------------------------------------------------------------------------- the form

  buildForm(config) {
    const tokenizer = $("#train-tokenizer", this.root);
    tokenizer.replaceChildren(...config.training.tokenizers.map((t) => el("option", { value: t }, t)));
    this.inputs.tokenizer = tokenizer;
    const corpora = Object.entries(config.corpora);
    $("#train-corpus", this.root).replaceChildren(
      ...corpora.map(([name, size]) => el("option", { value: name }, `${name} (${fmtBytes(size)})`)),
    );
    $('input[value="corpus"]', this.root).disabled = !corpora.length;
    for (const name of MAIN_FIELDS) $("#train-hyper", this.root).append(this.field(name));
    for (const name of MORE_FIELDS) $("#train-hyper-more", this.root).append(this.field(name));
    this.applyPreset("defaults");
    this.updateCorpusHint();
  }

  field(name) {
    const id = `train-${name.replaceAll("_", "-")}`;
    const fallback = this.defaults[name];
    if (typeof fallback === "boolean") {
      const box = el("input", { id, type: "checkbox" });
      this.inputs[name] = box;
      return el("div", { class: "check" }, el("label", {}, box, ` ${LABELS[name]}`));
    }
    if (CHOICES[name]) {
      const select = el("select", { id }, ...CHOICES[name].map((c) => el("option", { value: c }, c)));
      this.inputs[name] = select;
      return el("div", {}, el("label", { for: id }, LABELS[name]), select);
    }
    const [lo, bound] = this.bounds[name];
    const hi = Math.min(bound, Number.MAX_SAFE_INTEGER); // a seed beyond 2^53 would not survive a JS number
    const input = el("input", {
      id,
      type: "number",
      min: lo,
      max: hi,
      step: INTEGER.has(name) ? 1 : "any",
      inputmode: INTEGER.has(name) ? "numeric" : "decimal",
      placeholder: fallback === null ? "none" : String(fallback),
    });
    this.inputs[name] = input;
    const hint = `${fmtNumber(lo, 6)}–${fmtNumber(hi, 0)} · default ${fallback ?? "none"}`;
    return el("div", {}, el("label", { for: id }, `${LABELS[name]} `, el("span", { class: "hint" }, hint)), input);
  }

  applyPreset(preset) {
    const values = { ...this.defaults, ...PRESETS[preset] };
    for (const [name, input] of Object.entries(this.inputs)) {
      const value = values[name];
      if (input.type === "checkbox") input.checked = Boolean(value);
      else input.value = value === null || value === undefined ? "" : String(value);
    }
  }

  bind() {
    $("#train-form", this.root).addEventListener("submit", (event) => {
      event.preventDefault();
      this.submit();
    });
    for (const button of $$("[data-preset]", this.root)) {
      button.addEventListener("click", () => this.applyPreset(button.dataset.preset));
    }
    for (const radio of $$('input[name="source"]', this.root)) {
      radio.addEventListener("change", () => this.showSource());
    }
    $("#train-text", this.root).addEventListener("input", () => this.updateCorpusHint());
    $("#train-file", this.root).addEventListener("change", () => this.updateCorpusHint());
    $("#train-base", this.root).addEventListener("change", () => this.lockArchitecture());
    $("#job-cancel", this.root).addEventListener("click", () => this.cancel());
    $("#job-pause", this.root).addEventListener("click", () => this.pauseOrResume());
    $("#job-try", this.root).addEventListener("click", () => requestTry(this.job.model_id));
    $("#jobs-refresh", this.root).addEventListener("click", () => this.loadJobs());
  }

  source() {
    return $('input[name="source"]:checked', this.root).value;
  }

  showSource() {
    for (const box of $$("[data-source]", this.root)) box.hidden = box.dataset.source !== this.source();
  }

  updateCorpusHint() {
    const limit = `at most ${fmtBytes(this.limits.max_corpus_bytes)}`;
    const bytes = new TextEncoder().encode($("#train-text", this.root).value).length;
    $("#train-text-count", this.root).textContent = `${fmtBytes(bytes)} of UTF-8 text, ${limit}`;
    const file = $("#train-file", this.root).files[0];
    $("#train-file-size", this.root).textContent = file ? `${file.name}: ${fmtBytes(file.size)}, ${limit}` : limit;
  }

  renderBaseModels() {
    const select = $("#train-base", this.root);
    const current = select.value;
    const options = this.store.models.map((m) => el("option", { value: m.id }, m.id));
    select.replaceChildren(el("option", { value: "" }, "— a new model —"), ...options);
    select.value = this.store.has(current) ? current : "";
    this.lockArchitecture();
  }

  lockArchitecture() {
    const fineTune = Boolean($("#train-base", this.root).value);
    for (const name of ARCHITECTURE) this.inputs[name].disabled = fineTune;
  }

  // The hyperparameters that differ from the server's defaults (an omitted field keeps its default).
  hyperparameters() {
    const fineTune = Boolean($("#train-base", this.root).value);
    const chosen = {};
    for (const [name, input] of Object.entries(this.inputs)) {
      if (fineTune && ARCHITECTURE.includes(name)) continue;
      let value;
      if (input.type === "checkbox") value = input.checked;
      else if (input.type === "number") {
        if (input.value === "") continue;
        if (!input.checkValidity()) throw new Error(`${LABELS[name]}: enter a number from ${input.min} to ${input.max}.`);
        value = Number(input.value);
      } else value = input.value;
      if (value !== this.defaults[name]) chosen[name] = value;
    }
    return chosen;
  }

  // {json} or {form} for POST /train, or throws an Error that says what to fix.
  submission() {
    const fields = this.hyperparameters();
    const name = $("#train-name", this.root).value.trim();
    if (name && !/^[a-z0-9][a-z0-9._-]{0,63}$/.test(name)) {
      throw new Error("Name: lowercase letters, digits, '.', '_' and '-', starting with a letter or digit.");
    }
    if (name) fields.name = name;
    const base = $("#train-base", this.root).value;
    if (base) fields.base_model = base;
    // true: if the quality gate passes (no worse than the active model on the same held-out text)
    const gated = $("#train-gate", this.root).checked;
    fields.activate = $("#train-activate", this.root).checked ? (gated ? true : "always") : false;
    if ($("#train-activate", this.root).checked && $("#train-canary", this.root).checked) {
      const percent = Number($("#train-canary-percent", this.root).value);
      if (!(percent >= 1 && percent <= 100)) throw new Error("Canary share: a percentage from 1 to 100.");
      fields.activate = `canary:${percent / 100}`; // the quality gate applies to a canary too
    }
    const source = this.source();
    if (source === "corpus") return { json: { ...fields, corpus: $("#train-corpus", this.root).value } };
    if (source === "text") {
      const text = $("#train-text", this.root).value;
      if (!text.trim()) throw new Error("Paste some training text first.");
      return { json: { ...fields, text } };
    }
    const file = $("#train-file", this.root).files[0];
    if (!file) throw new Error("Choose a text file to upload.");
    if (file.size > this.limits.max_corpus_bytes) {
      throw new Error(`The file is ${fmtBytes(file.size)}; the server takes ${fmtBytes(this.limits.max_corpus_bytes)}.`);
    }
    const form = new FormData();
    for (const [key, value] of Object.entries(fields)) form.append(key, String(value));
    form.append("file", file);
    return { form };
  }

  async submit() {
    const errorBox = $("#train-error", this.root);
    const button = $("#train-submit", this.root);
    showError(errorBox, "");
    let body;
    try {
      body = this.submission();
    } catch (err) {
      showError(errorBox, err.message);
      return;
    }
    button.disabled = true;
    try {
      const job = await (await call("POST", "/train", body)).json();
      this.follow(job);
      this.loadJobs();
    } catch (err) {
      showError(errorBox, err.message);
    } finally {
      button.disabled = false;
    }
  }

  // ---------------------------------------------------------------------------- following a job

  async follow(job) {
    this.follower?.abort();
    const follower = new AbortController();
    this.follower = follower;
    this.job = job;
    this.resetJobView();
    let lastId = null;
    let failures = 0;
    let replay = this.isFinal(); // a finished job: its events once, for its chart, samples and verdict
    while (!follower.signal.aborted && (replay || !this.isFinal())) {
      replay = false;
      try {
        const headers = lastId ? { "Last-Event-ID": lastId } : {};
        const response = await call("GET", `/train/${job.id}/events`, { signal: follower.signal, headers });
        for await (const batch of eventBatches(response)) {
          for (const event of batch) {
            lastId = event.id ?? lastId;
            this.onEvent(event);
          }
          failures = 0;
        }
      } catch (err) {
        if (err.name === "AbortError") return;
        if (err.status >= 400 && err.status < 500 && err.status !== 429) {
          this.setResult(err.message, "bad");
          return;
        }
        failures += 1;
        this.setResult(`${err.message} Reconnecting…`, "warn");
      }
      if (!this.isFinal()) await sleep(Math.min(5, failures + 1) * 1000, follower.signal);
    }
  }

  isFinal() {
    return ["succeeded", "failed", "cancelled"].includes(this.job?.state);
  }

  resetJobView() {
    const job = this.job;
    this.canary = null; // the "canary" event's, when the job's model became production's canary
    $("#job", this.root).hidden = false;
    $("#job-title", this.root).textContent = `${job.params?.name ?? "model"} · ${job.id}`;
    $("#job-samples", this.root).replaceChildren();
    $("#job-try", this.root).hidden = true;
    $("#job-progress", this.root).value = 0;
    for (const id of ["epoch", "step", "train-loss", "val-loss", "rate", "eta"]) $(`#job-${id}`, this.root).textContent = "—";
    this.setResult("", "");
    this.chart.clear();
    this.setState(job.state);
  }

  setState(state, detail = "") {
    this.job.state = state;
    const badge = $("#job-state", this.root);
    badge.textContent = detail ? `${state} · ${detail}` : state;
    badge.dataset.state = state;
    $("#job", this.root).dataset.state = state;
    $("#job-cancel", this.root).disabled = this.isFinal();
    const pause = $("#job-pause", this.root);
    pause.textContent = state === "paused" ? "Resume" : "Pause";
    pause.disabled = this.isFinal();
  }

  setResult(message, tone) {
    const box = $("#job-result", this.root);
    box.textContent = message;
    box.dataset.tone = tone;
  }

  onEvent({ event, data }) {
    const handler = {
      queued: () => this.setState("queued", `position ${data.position ?? "?"} in the queue`),
      started: () => this.setState("running", `attempt ${data.attempt}`),
      requeued: () => this.setState("queued", data.reason),
      progress: () => this.onProgress(data),
      epoch: () => this.onEpoch(data),
      checkpoint: () => this.setResult(`Saved a resumable state at step ${fmtNumber(data.step)}.`, ""),
      model_checkpoint: () =>
        this.setResult(`Checkpoint ${data.model_id}: epoch ${data.epoch}, val loss ${fmtLoss(data.val_loss)}.`, ""),
      paused: () => {
        this.setState("paused", `saved at step ${fmtNumber(data.saved_step)}`);
        this.setResult("Paused: the training state is saved and the worker is free. Resume goes on from the same step.", "warn");
      },
      resumed: () => this.setState("queued", "resumed"),
      canary: () => {
        this.canary = data.canary;
        this.setResult(`${data.canary.model} is production's canary, for ${Math.round(data.canary.weight * 100)}% of its traffic.`, "");
      },
      published: () => this.setResult(`Published ${data.model_id}.`, ""),
      gate: () => this.setResult(`Quality gate ${gateWords(data.result)}: ${data.reason}.`, data.result === "held_back" ? "warn" : ""),
      error: () => this.setResult(`${data.error.message} Reconnecting…`, "warn"),
    }[event];
    if (handler) handler();
    else if (FINAL[event]) this.onFinal(FINAL[event], data);
  }

  onProgress(data) {
    if (this.job.state !== "running") this.setState("running");
    const set = (id, text) => ($(`#job-${id}`, this.root).textContent = text);
    set("epoch", `${data.epoch} of ${data.epochs}`);
    set("step", `${fmtNumber(data.step)} of ${fmtNumber(data.total_steps)}`);
    set("train-loss", fmtLoss(data.train_loss));
    set("rate", fmtNumber(data.tokens_per_s));
    set("eta", fmtSeconds(data.eta_s));
    const bar = $("#job-progress", this.root);
    bar.max = Math.max(1, data.total_steps);
    bar.value = data.step;
    this.chart.setMaxStep(data.total_steps);
    this.chart.add("train", data.step, data.train_loss);
  }

  onEpoch(data) {
    this.onProgress(data);
    $("#job-val-loss", this.root).textContent = fmtLoss(data.val_loss);
    this.chart.add("val", data.step, data.val_loss);
    if (data.sample) {
      const caption = `Epoch ${data.epoch} · val loss ${fmtLoss(data.val_loss)}`;
      $("#job-samples", this.root).prepend(el("li", {}, el("span", { class: "hint" }, caption), el("pre", {}, data.sample)));
    }
  }

  onFinal(state, data) {
    this.setState(state);
    this.job.model_id = data.model_id;
    $("#job-eta", this.root).textContent = state === "succeeded" ? "done" : "—";
    if (state === "succeeded") {
      const metrics = data.metrics ?? {};
      const heldBack = data.gate?.result === "held_back";
      // a held-back model's note repeats the gate's reason, which the verdict below gives
      const note = data.note && !heldBack ? `: ${data.note}` : "";
      const canary = this.canary?.model === data.model_id;
      const activated = data.activated ? "and activated" : canary ? `as production's canary: ${data.note}` : `(not activated${note})`;
      const gate = data.gate ? ` Quality gate ${gateWords(data.gate.result)}: ${data.gate.reason}.` : "";
      const tone = data.activated || canary || !data.gate ? "good" : "warn";
      this.setResult(`Published ${data.model_id} ${activated}. Validation loss ${fmtLoss(metrics.val_loss)}.${gate}`, tone);
      const tryButton = $("#job-try", this.root);
      tryButton.textContent = `Try ${data.model_id}`;
      tryButton.hidden = false;
      this.store.refresh();
    } else if (state === "failed") {
      this.setResult(`Training failed: ${data.error ?? "no reason given"}`, "bad");
    } else {
      this.setResult("Cancelled: nothing was published.", "warn");
    }
    this.loadJobs();
  }

  async cancel() {
    if (!this.job || this.isFinal()) return;
    $("#job-cancel", this.root).disabled = true;
    try {
      const job = await sendJSON("DELETE", `/train/${this.job.id}`);
      if (job.state !== "cancelled") this.setResult("Cancelling: the worker stops within seconds…", "warn");
    } catch (err) {
      this.setResult(err.message, "bad");
      $("#job-cancel", this.root).disabled = this.isFinal();
    }
  }

  async pauseOrResume() {
    if (!this.job || this.isFinal()) return;
    const action = this.job.state === "paused" ? "resume" : "pause";
    $("#job-pause", this.root).disabled = true;
    try {
      const job = await sendJSON("POST", `/train/${this.job.id}/${action}`);
      if (action === "pause" && job.state !== "paused") this.setResult("Pausing: the worker saves the state within seconds…", "warn");
      if (action === "resume") this.setResult("Resumed: the job goes on from its saved step.", "");
    } catch (err) {
      this.setResult(err.message, "bad");
    } finally {
      $("#job-pause", this.root).disabled = this.isFinal();
    }
  }

  // ---------------------------------------------------------------------------- recent jobs

  async loadJobs() {
    const errorBox = $("#jobs-error", this.root);
    let jobs;
    try {
      jobs = (await getJSON("/train?limit=10")).jobs;
      showError(errorBox, "");
    } catch (err) {
      showError(errorBox, err.message);
      return;
    }
    const rows = jobs.map((job) => {
      const follow = el("button", { type: "button", class: "quiet" }, "Follow");
      follow.addEventListener("click", () => this.follow(job));
      const name = job.model_id ?? job.params?.name ?? "?";
      return el(
        "li",
        { dataset: { state: job.state } },
        el("span", { class: "badge", dataset: { state: job.state } }, job.state),
        el("span", { class: "job-name" }, name),
        job.gate?.result === "held_back"
          ? el("span", { class: "badge", title: job.gate.reason, dataset: { state: "held_back" } }, "held back by the gate")
          : null,
        el("span", { class: "hint" }, fmtDate(job.created)),
        follow,
      );
    });
    $("#job-list", this.root).replaceChildren(...(rows.length ? rows : [el("li", { class: "hint" }, "No jobs yet.")]));
    const unfinished = jobs.find((job) => ["running", "queued", "paused"].includes(job.state));
    if (!this.job && unfinished) this.follow(unfinished); // a reload picks the running job up again
  }
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener("abort", () => {
      clearTimeout(timer);
      resolve();
    });
  });
}
