// The state the panels share: the registry's models, the active one and the aliases. One fetch of
// GET /models (and GET /models/aliases) feeds every panel; a panel that changes the registry calls
// refresh() and the others redraw.

import { getJSON } from "./api.js";

export class ModelStore extends EventTarget {
  constructor() {
    super();
    this.models = []; // GET /models "models", newest first
    this.active = null; // the active model id
    this.aliases = []; // GET /models/aliases "data": {alias, model, canary: null | {model, weight}, ...}
    this.error = null; // the ApiError of the last refresh, or null
  }

  async refresh() {
    try {
      const [listing, aliases] = await Promise.all([getJSON("/models"), getJSON("/models/aliases")]);
      this.models = listing.models;
      this.active = listing.active;
      this.aliases = aliases.data;
      this.error = null;
    } catch (err) {
      this.error = err;
    }
    this.dispatchEvent(new Event("change"));
    return this;
  }

  has(modelId) {
    return this.models.some((m) => m.id === modelId);
  }
}

// "Try this model" from any panel: the generate panel listens and selects it.
export function requestTry(modelId) {
  document.dispatchEvent(new CustomEvent("textgen:try-model", { detail: { modelId } }));
}
