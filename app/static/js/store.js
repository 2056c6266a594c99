// The state the panels share: the registry's models and the active one. One fetch of GET /models
// feeds every panel; a panel that changes the registry calls refresh() and the others redraw.

import { getJSON } from "./api.js";

export class ModelStore extends EventTarget {
  constructor() {
    super();
    this.models = []; // GET /models "models", newest first
    this.active = null; // the active model id
    this.error = null; // the ApiError of the last refresh, or null
  }

  async refresh() {
    try {
      const listing = await getJSON("/models");
      this.models = listing.models;
      this.active = listing.active;
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
