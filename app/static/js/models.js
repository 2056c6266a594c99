// The models panel: every model of the registry with its metrics, the active one marked,
// Activate (roll forward or back) and Delete; then the aliases, each with its model and any canary
// and its weight, with Promote and Abort for a canary. Every change asks for a confirmation first.

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
    const aliases = this.store.aliases.map((alias) => this.aliasRow(alias));
    const none = el("tr", {}, el("td", { colspan: 5, class: "hint" }, "No aliases yet."));
    $("#aliases-body", this.root).replaceChildren(...(aliases.length ? aliases : this.store.error ? [] : [none]));
  }

  aliasRow(alias) {
    const canary = alias.canary;
    const share = canary ? `${fmtNumber(canary.weight * 100, 1)}%` : "";
    const event = alias.event; // what the service did by itself: an automatic abort
    const canaryCell = el(
      "td",
      { "data-label": "Canary" },
      canary
        ? el("span", {}, el("strong", {}, canary.model), ` serves ${share} of the routing keys`)
        : el("span", { class: "hint" }, "none"),
      event
        ? el("p", { class: "hint alias-event" }, `${event.kind.replaceAll("_", " ")} (${event.canary?.model ?? "?"}): ${event.reason}`)
        : null,
    );
    const promote = el("button", { type: "button", disabled: !canary, "aria-label": `Promote ${alias.alias}'s canary` }, "Promote");
    promote.addEventListener("click", () => this.promote(alias, promote));
    const abort = el("button", { type: "button", class: "danger", disabled: !canary, "aria-label": `Abort ${alias.alias}'s canary` }, "Abort");
    abort.addEventListener("click", () => this.abort(alias, abort));
    return el(
      "tr",
      { dataset: { alias: alias.alias, canary: canary ? canary.model : "" } },
      el("td", { "data-label": "Alias" }, el("strong", {}, alias.alias)),
      el("td", { "data-label": "Model" }, alias.model),
      canaryCell,
      el("td", { "data-label": "Updated" }, fmtDate(alias.updated_at)),
      el("td", { class: "row-actions" }, promote, abort),
    );
  }

  async promote(alias, button) {
    const { model, weight } = alias.canary;
    const ok = await confirmAction(
      `Promote ${model}?`,
      `${model} serves ${fmtNumber(weight * 100, 1)}% of ${alias.alias} now; it will serve all of it, in place of ${alias.model}.`,
      "Promote",
    );
    if (!ok) return;
    const path = `/models/aliases/${alias.alias}/promote`;
    await this.change(button, "Promoting…", () => sendJSON("POST", path), `${model} is ${alias.alias}'s model now.`);
  }

  async abort(alias, button) {
    const { model } = alias.canary;
    const ok = await confirmAction(`Abort the canary ${model}?`, `${alias.model} will serve all of ${alias.alias} again.`, "Abort canary");
    if (!ok) return;
    const path = `/models/aliases/${alias.alias}/abort`;
    const done = `${alias.alias}'s canary ${model} was aborted; ${alias.model} serves all of it.`;
    await this.change(button, "Aborting…", () => sendJSON("POST", path), done);
  }

  row(model) {
    const active = model.id === this.store.active;
    const name = el(
      "td",
      { "data-label": "Model" },
      el("strong", {}, model.id),
      active ? el("span", { class: "badge", dataset: { state: "active" } }, "active") : null,
      model.loaded ? el("span", { class: "badge", dataset: { state: "loaded" } }, "loaded") : null,
      ...this.store.aliases
        .filter((alias) => alias.canary?.model === model.id)
        .map((alias) => el("span", { class: "badge", dataset: { state: "canary" } }, `${alias.alias}'s canary`)),
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
