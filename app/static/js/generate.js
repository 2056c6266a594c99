// The generate panel: a prompt and every sampling parameter -> POST /generate with "stream": true,
// the text appended as token events arrive, live timing, Stop (abort the fetch), and the exact
// request as a curl command.

import { ApiError, apiKey, call, eventBatches } from "./api.js";
import { $, el, fmtNumber, fmtSeconds, showError } from "./dom.js";

// The sampling parameters of POST /generate (docs/API.md): number bounds, the slider's narrower
// everyday range, and the API's default. max_tokens' upper bound is the server's limit.
const PARAMS = [
  { name: "max_tokens", label: "Max tokens", min: 1, max: null, step: 1, slider: [1, 1000], value: 200 },
  { name: "temperature", label: "Temperature", hint: "0 = greedy", min: 0, max: 5, step: 0.05, slider: [0, 2], value: 1 },
  { name: "top_k", label: "Top-k", hint: "0 = off", min: 0, max: 100000, step: 1, slider: [0, 200], value: 0 },
  { name: "top_p", label: "Top-p", min: 0.01, max: 1, step: 0.01, slider: [0.01, 1], value: 1 },
  { name: "min_p", label: "Min-p", min: 0, max: 0.99, step: 0.01, slider: [0, 0.5], value: 0 },
  {
    name: "repetition_penalty",
    label: "Repetition penalty",
    hint: "1 = off",
    min: 0.01,
    max: 10,
    step: 0.01,
    slider: [0.5, 2],
    value: 1,
  },
];

export class GeneratePanel {
  constructor(root, { config, store }) {
    this.root = root;
    this.store = store;
    this.limits = config.limits;
    this.controller = null; // the AbortController of the running generation
    this.inputs = {}; // name -> the number input of each sampling parameter
    this.buildSliders();
    this.bind();
    this.updateRequest();
    store.addEventListener("change", () => this.renderModels());
  }

  buildSliders() {
    const box = $("#gen-sliders", this.root);
    for (const p of PARAMS) {
      const max = p.max ?? this.limits.max_tokens;
      const id = `gen-${p.name.replaceAll("_", "-")}`;
      const number = el("input", { id, type: "number", min: p.min, max, step: p.step, value: p.value });
      const slider = el("input", {
        type: "range",
        min: p.slider[0],
        max: Math.min(p.slider[1], max),
        step: p.step,
        value: p.value,
        "aria-label": `${p.label} slider`,
        tabindex: -1, // the number input is the keyboard's control; the slider is for pointers
      });
      slider.addEventListener("input", () => {
        number.value = slider.value;
        this.updateRequest();
      });
      number.addEventListener("input", () => {
        slider.value = number.value;
      });
      const hint = `${fmtNumber(p.min, 2)}–${fmtNumber(max, 2)}${p.hint ? `, ${p.hint}` : ""}`;
      box.append(
        el("div", { class: "param" }, el("label", { for: id }, `${p.label} `, el("span", { class: "hint" }, hint))),
        el("div", { class: "pair" }, slider, number),
      );
      this.inputs[p.name] = number;
    }
  }

  bind() {
    const form = $("#gen-form", this.root);
    form.addEventListener("submit", (event) => {
      event.preventDefault();
      this.run();
    });
    form.addEventListener("input", () => this.updateRequest());
    form.addEventListener("change", () => this.updateRequest());
    $("#gen-stop", this.root).addEventListener("click", () => this.stop());
    $("#gen-copy", this.root).addEventListener("click", () => this.copyCurl());
    $("#gen-prompt", this.root).addEventListener("keydown", (event) => {
      if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) {
        event.preventDefault();
        form.requestSubmit();
      }
    });
    document.addEventListener("keydown", (event) => {
      // on the document: the focused Generate button is disabled while it runs, which drops the focus
      if (event.key === "Escape" && this.controller && !this.root.hidden) this.stop();
    });
    document.addEventListener("textgen:try-model", (event) => {
      this.renderModels();
      $("#gen-model", this.root).value = event.detail.modelId;
      this.updateRequest();
    });
    document.addEventListener("textgen:key-changed", () => this.updateRequest());
  }

  renderModels() {
    const select = $("#gen-model", this.root);
    const current = select.value;
    const { models, active } = this.store;
    const activeOption = el("option", { value: "" }, `Active model (${active ?? "none"})`);
    const options = models.map((m) => el("option", { value: m.id }, m.id === active ? `${m.id} · active` : m.id));
    select.replaceChildren(activeOption, ...options);
    select.value = this.store.has(current) ? current : "";
    this.updateRequest();
  }

  // The request body exactly as it is sent, or null (with the reason shown) if a field is invalid.
  buildRequest() {
    const prompt = $("#gen-prompt", this.root).value;
    const body = { prompt };
    const model = $("#gen-model", this.root).value;
    if (model) body.model = model;
    for (const p of PARAMS) {
      const input = this.inputs[p.name];
      if (input.value === "" || !input.checkValidity()) {
        return { error: `${p.label}: enter a number from ${input.min} to ${input.max} (step ${input.step}).` };
      }
      body[p.name] = Number(input.value);
    }
    const stop = stopStrings($("#gen-stop-strings", this.root).value);
    if (stop.length > this.limits.max_stop_strings) {
      return { error: `At most ${this.limits.max_stop_strings} stop strings.` };
    }
    if (stop.length) body.stop = stop;
    const seed = $("#gen-seed", this.root);
    if (seed.value !== "") {
      if (!seed.checkValidity() || !Number.isSafeInteger(Number(seed.value))) {
        return { error: `Seed: a whole number from 0 to ${Number.MAX_SAFE_INTEGER}, or empty for a random one.` };
      }
      body.seed = Number(seed.value);
    }
    const kind = $("#gen-constraint-kind", this.root).value;
    const constraint = structuredOutputs(kind, $("#gen-constraint", this.root).value);
    if (constraint.error) return { error: constraint.error };
    if (constraint.value) body.structured_outputs = constraint.value;
    body.stream = true;
    return { body };
  }

  updateRequest() {
    const prompt = $("#gen-prompt", this.root).value;
    $("#gen-prompt-count", this.root).textContent =
      `${fmtNumber(prompt.length)} of ${fmtNumber(this.limits.max_prompt_chars)}`;
    const { body, error } = this.buildRequest();
    $("#gen-curl", this.root).textContent = body ? curlCommand("/generate", body) : error;
  }

  async copyCurl() {
    const text = $("#gen-curl", this.root).textContent;
    const button = $("#gen-copy", this.root);
    try {
      await navigator.clipboard.writeText(text);
      button.textContent = "Copied";
    } catch {
      window.getSelection().selectAllChildren($("#gen-curl", this.root)); // no clipboard (plain http): select it
      button.textContent = "Selected: press Ctrl+C";
    }
    setTimeout(() => (button.textContent = "Copy"), 2000);
  }

  setRunning(running) {
    $("#gen-start", this.root).disabled = running;
    $("#gen-stop", this.root).disabled = !running;
    $("#gen-output", this.root).setAttribute("aria-busy", String(running));
    this.root.dataset.running = String(running);
  }

  stop() {
    if (this.controller) this.controller.abort();
  }

  async run() {
    if (this.controller) return;
    const errorBox = $("#gen-error", this.root);
    const { body, error } = this.buildRequest();
    showError(errorBox, error);
    if (!body) return;
    this.controller = new AbortController();
    this.setRunning(true);
    const output = new StreamOutput(this.root, body.prompt);
    const stats = new Stats(this.root);
    try {
      const response = await call("POST", "/generate", { json: body, signal: this.controller.signal });
      stats.model(response.headers.get("X-Model-Version"));
      for await (const batch of eventBatches(response)) {
        output.append(stats.take(batch));
      }
      if (!stats.finish) throw new ApiError(0, "The stream ended before its done event.");
    } catch (err) {
      if (err.name === "AbortError") stats.stopped();
      else showError(errorBox, err.message);
    } finally {
      this.controller = null;
      this.setRunning(false);
      stats.end();
    }
  }
}

// The output box: the prompt, then the generated text appended to one text node.
class StreamOutput {
  constructor(root, prompt) {
    this.box = $("#gen-output", root);
    this.box.classList.remove("idle");
    $("#gen-out-prompt", root).textContent = prompt;
    this.text = document.createTextNode("");
    $("#gen-out-text", root).replaceChildren(this.text);
  }

  append(text) {
    if (!text) return;
    const box = this.box;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
    this.text.appendData(text);
    if (atBottom) box.scrollTop = box.scrollHeight; // follow the text unless the reader scrolled up
  }
}

// Timing of one generation: time to first token, tokens, tokens/s, finish reason, model version.
class Stats {
  constructor(root) {
    this.root = root;
    this.started = performance.now();
    this.first = null; // when the first token event arrived
    this.last = null;
    this.tokens = 0; // token events so far; the done event's usage is exact
    this.finish = null;
    this.version = null;
    this.render();
  }

  model(version) {
    this.version = version;
    this.render();
  }

  // The text of one batch of events; records timing, the finish reason and the model.
  take(batch) {
    let text = "";
    for (const { event, data } of batch) {
      if (event === "token") {
        this.first ??= performance.now();
        this.tokens += 1;
        text += data.text;
      } else if (event === "done") {
        this.finish = data.finish_reason;
        this.version = data.model;
        this.tokens = data.usage.completion_tokens;
      } else if (event === "error") {
        throw new ApiError(500, `Generation failed mid-stream: ${data.error.message}`, data.error);
      }
    }
    this.last = performance.now();
    this.render();
    return text;
  }

  stopped() {
    this.finish = "stopped";
  }

  end() {
    this.ended = true; // what never came shows as "—", no longer as "…"
    this.render();
  }

  // Decode speed after the first token; over the whole request when every token came in one read.
  rate() {
    if (this.first === null || this.tokens < 1) return null;
    const span = (this.last - this.first) / 1000;
    if (span > 0 && this.tokens > 1) return (this.tokens - 1) / span;
    const whole = (this.last - this.started) / 1000;
    return whole > 0 ? this.tokens / whole : null;
  }

  render() {
    const set = (id, text) => ($(`#gen-stat-${id}`, this.root).textContent = text);
    const pending = this.ended ? "—" : "…";
    const ttft = this.first === null ? null : (this.first - this.started) / 1000;
    set("model", this.version ?? pending);
    set("ttft", ttft === null ? pending : fmtSeconds(ttft));
    set("tokens", fmtNumber(this.tokens));
    set("rate", fmtNumber(this.rate(), 1));
    set("finish", this.finish === "stopped" ? "stopped (by you)" : (this.finish ?? pending));
    this.root.dataset.finish = this.finish ?? "";
  }
}

// One stop string per line; "\n" and "\t" typed as two characters mean a newline and a tab.
function stopStrings(text) {
  const unescape = (s) => s.replace(/\\(n|t|\\)/g, (_, c) => ({ n: "\n", t: "\t", "\\": "\\" })[c]);
  return text
    .split("\n")
    .filter((line) => line !== "")
    .map(unescape);
}

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

// The constraint field as the request's `structured_outputs` ({value}), nothing ({}) when none is set,
// or {error} for a JSON schema that is not JSON. A choice list is one choice per line.
export function structuredOutputs(kind, text) {
  if (!kind || !text.trim()) return {};
  if (kind === "choice") return { value: { choice: text.split("\n").filter((line) => line !== "") } };
  if (kind === "json") {
    try {
      return { value: { json: JSON.parse(text) } };
    } catch (e) {
      return { error: `Constraint: the JSON schema is not JSON (${e.message}).` };
    }
  }
  return { value: { [kind]: text } };
}

// The curl command that sends `body` to `path`; the key itself is never printed.
export function curlCommand(path, body) {
  const lines = [`curl -N ${shellQuote(location.origin + path)}`, `-H 'Content-Type: application/json'`];
  if (apiKey()) lines.push(`-H "Authorization: Bearer $TEXTGEN_API_KEY"`);
  lines.push(`-d ${shellQuote(JSON.stringify(body))}`);
  return lines.join(" \\\n  ");
}
