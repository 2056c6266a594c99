// The models panel: every model of the registry with its metrics, the active one marked,
// Activate (roll forward or back) and Delete, each after a confirmation.

import { sendJSON } from "./api.js";
import { $, confirmAction, el, fmtBytes, fmtDate, fmtNumber, showError } from "./dom.js";
import { requestTry } from "./store.js";

export class ModelsPanel {
  constructor(root, { store }) {
    this.root = root;
    this.store = store;
    this.failure = null; // the message of the last failed Activate or Delete
    store.addEventListener("change", () => this.render());
    $("#models-refresh", root).addEventListener("click", () => {
      this.failure = null;
      store.refresh();
    });
  }

  render() {
    showError($("#models-error", this.root), this.failure ?? this.store.error?.message);
    const rows = this.store.models.map((model) => this.row(model));
    const empty = el("tr", {}, el("td", { colspan: 7, class: "hint" }, "No models in the registry yet."));
    $("#models-body", this.root).replaceChildren(...(rows.length ? rows : this.store.error ? [] : [empty]));
  }

  row(model) {
    const active = model.id === this.store.active;
    const name = el(
      "td",
      { "data-label": "Model" },
      el("strong", {}, model.id),
      active ? el("span", { class: "badge", dataset: { state: "active" } }, "active") : null,
      model.loaded ? el("span", { class: "badge", dataset: { state: "loaded" } }, "loaded") : null,
    );
    const tokenizer = model.tokenizer ?? {};
    return el(
      "tr",
      { dataset: { model: model.id, active: String(active) } },
      name,
      el("td", { "data-label": "Created" }, fmtDate(model.created_at)),
      el("td", { "data-label": "Parameters", class: "num" }, fmtNumber(model.parameters)),
      el("td", { "data-label": "Tokenizer" }, `${tokenizer.kind ?? "?"} · ${fmtNumber(tokenizer.vocab_size)} tokens`),
      el("td", { "data-label": "Metrics" }, metricsList(model.metrics ?? {})),
      el("td", { "data-label": "Size", class: "num" }, fmtBytes(model.size_bytes)),
      el("td", { class: "row-actions" }, ...this.actions(model, active)),
    );
  }

  actions(model, active) {
    const use = el("button", { type: "button", class: "quiet", "aria-label": `Use ${model.id} in Generate` }, "Use");
    use.addEventListener("click", () => requestTry(model.id));
    const activate = el("button", { type: "button", disabled: active, "aria-label": `Activate ${model.id}` }, "Activate");
    activate.addEventListener("click", () => this.activate(model.id, activate));
    const remove = el("button", { type: "button", class: "danger", disabled: active, "aria-label": `Delete ${model.id}` }, "Delete");
    remove.addEventListener("click", () => this.remove(model.id, remove));
    return [use, activate, remove];
  }

  async activate(modelId, button) {
    const previous = this.store.active;
    const ok = await confirmAction(
      `Activate ${modelId}?`,
      `New requests will use ${modelId}; requests already running finish on ${previous ?? "the current model"}.`,
      "Activate",
    );
    if (!ok) return;
    await this.change(button, "Activating…", () => sendJSON("POST", `/models/${modelId}/activate`), `${modelId} is active now.`);
  }

  async remove(modelId, button) {
    const ok = await confirmAction(`Delete ${modelId}?`, `Its checkpoint is removed from the models folder for good.`, "Delete");
    if (!ok) return;
    await this.change(button, "Deleting…", () => sendJSON("DELETE", `/models/${modelId}`), `${modelId} was deleted.`);
  }

  async change(button, busyLabel, action, done) {
    const notice = $("#models-notice", this.root);
    this.failure = null;
    showError($("#models-error", this.root), "");
    notice.textContent = busyLabel;
    button.disabled = true;
    try {
      await action();
      notice.textContent = done;
    } catch (err) {
      notice.textContent = "";
      this.failure = err.message;
    }
    await this.store.refresh(); // redraws every panel, this one with its error, if any
  }
}

// {val_loss: 1.41, val_perplexity: 4.1, ...} -> a short <dl>, numbers rounded.
function metricsList(metrics) {
  const entries = Object.entries(metrics).filter(([, v]) => typeof v === "number" || typeof v === "string");
  if (!entries.length) return el("span", { class: "hint" }, "none");
  return el(
    "dl",
    { class: "metrics" },
    ...entries.map(([key, value]) =>
      el(
        "div",
        {},
        el("dt", {}, key.replaceAll("_", " ")),
        el("dd", {}, typeof value === "number" ? fmtNumber(value, Number.isInteger(value) ? 0 : 3) : value),
      ),
    ),
  );
}
