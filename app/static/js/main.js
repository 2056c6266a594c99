// The playground's entry point: reads GET /ui/config, sets up the API-key field, the tabs and the
// three panels, and keeps the "serving" badge in step with GET /readyz.

import { apiKey, getJSON, setApiKey } from "./api.js";
import { $, $$ } from "./dom.js";
import { GeneratePanel } from "./generate.js";
import { ModelsPanel } from "./models.js";
import { ModelStore } from "./store.js";
import { TrainPanel } from "./train.js";

const READY_POLL_MS = 5000;

async function main() {
  let config;
  try {
    config = await getJSON("/ui/config");
  } catch (err) {
    $("#serving").textContent = err.message;
    return;
  }
  $("#version").textContent = `textgen ${config.version}`;
  const store = new ModelStore();
  const panels = {
    generate: new GeneratePanel($("#panel-generate"), { config, store }),
    train: new TrainPanel($("#panel-train"), { config, store }),
    models: new ModelsPanel($("#panel-models"), { store }),
  };
  setUpKey(config, () => {
    store.refresh();
    panels.train.loadJobs();
  });
  setUpTabs();
  document.addEventListener("textgen:try-model", () => {
    selectTab("generate");
    $("#gen-prompt").focus();
  });
  store.addEventListener("change", () => document.body.classList.add("loaded"));
  await store.refresh();
  panels.train.loadJobs();
  followReadiness(store);
}

// The key field appears when the server has keys configured; the key lives in sessionStorage only.
function setUpKey(config, onChange) {
  const form = $("#key-form");
  const input = $("#api-key");
  form.hidden = !config.auth;
  input.value = apiKey();
  const describe = () => {
    $("#key-state").textContent = apiKey()
      ? "key set for this tab (session storage)"
      : "enter a key: this server refuses requests without one";
  };
  const changed = () => {
    describe();
    document.dispatchEvent(new Event("textgen:key-changed"));
    onChange();
  };
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    setApiKey(input.value.trim());
    changed();
  });
  $("#key-clear").addEventListener("click", () => {
    input.value = "";
    setApiKey("");
    changed();
  });
  describe();
}

// ARIA tabs: click or arrow keys; the URL's #hash remembers the panel.
function setUpTabs() {
  const tabs = $$('[role="tab"]');
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab.id.replace("tab-", "")));
    tab.addEventListener("keydown", (event) => {
      const i = tabs.indexOf(tab);
      const next = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: tabs.length - 1 }[event.key];
      if (next === undefined) return;
      event.preventDefault();
      const target = tabs[(next + tabs.length) % tabs.length];
      selectTab(target.id.replace("tab-", ""));
      target.focus();
    });
  }
  window.addEventListener("hashchange", () => selectTab(location.hash.slice(1), false));
  selectTab(location.hash.slice(1) || "generate", false);
}

function selectTab(name, remember = true) {
  if (!$(`#tab-${name}`)) return;
  for (const tab of $$('[role="tab"]')) {
    const selected = tab.id === `tab-${name}`;
    tab.setAttribute("aria-selected", String(selected));
    tab.tabIndex = selected ? 0 : -1;
    $(`#${tab.getAttribute("aria-controls")}`).hidden = !selected;
  }
  if (remember && location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
}

// The badge says which model this replica serves; a change made elsewhere (another tab, a
// training job, another replica) refreshes the model list.
function followReadiness(store) {
  const badge = $("#serving");
  const check = async () => {
    if (document.visibilityState === "visible") {
      let model = null;
      try {
        const response = await fetch("/readyz");
        const body = await response.json();
        model = body.model ?? null;
        badge.textContent = model ? `serving ${model}` : body.error?.message ?? "not ready";
        badge.dataset.ready = String(Boolean(model));
      } catch (err) {
        badge.textContent = `cannot reach the server (${err.message})`;
        badge.dataset.ready = "false";
      }
      if (model && model !== store.active) await store.refresh();
    }
    setTimeout(check, READY_POLL_MS);
  };
  store.addEventListener("change", () => {
    if (store.active && badge.dataset.ready === "true") badge.textContent = `serving ${store.active}`;
  });
  check();
}

main();
