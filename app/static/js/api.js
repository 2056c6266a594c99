// Every request the page makes goes through here: the API key, errors turned into sentences a
// person can act on, and Server-Sent Events read from a fetch() body (EventSource can neither
// POST nor send an Authorization header).

const KEY_STORAGE = "textgen.apiKey";

export function apiKey() {
  return sessionStorage.getItem(KEY_STORAGE) || "";
}

export function setApiKey(key) {
  if (key) sessionStorage.setItem(KEY_STORAGE, key);
  else sessionStorage.removeItem(KEY_STORAGE);
}

export class ApiError extends Error {
  constructor(status, message, detail = null) {
    super(message);
    this.status = status; // 0 = the server could not be reached
    this.detail = detail; // the body's `error` object, when there was one
  }
}

// One sentence per status a user can do something about; the server's own message follows.
export function explain(status, detail, retryAfter) {
  const message = String(detail).replace(/\.$/, ""); // the sentence goes on after it
  switch (status) {
    case 0:
      return `Cannot reach the server (${message}). Is textgen still running?`;
    case 401:
      return `API key needed (401): ${message}. Enter a valid key in the API key field at the top.`;
    case 403:
      return `This key is not allowed to do that (403): ${message}.`;
    case 429: {
      const when = /retry/i.test(message) ? "" : ` Try again in ${retryAfter || "a few"} s.`;
      return `The server is busy (429): ${message}.${when}`;
    }
    case 503:
      return `The service is unavailable (503): ${message}.${retryAfter ? ` Try again in ${retryAfter} s.` : ""}`;
    default:
      return String(detail);
  }
}

function headersWith(extra) {
  const headers = new Headers(extra);
  const key = apiKey();
  if (key) headers.set("Authorization", `Bearer ${key}`);
  return headers;
}

async function errorOf(response) {
  let detail = null;
  try {
    detail = (await response.json()).error || null;
  } catch {
    // not JSON: a proxy's page, say
  }
  const message = detail?.message || response.statusText || `HTTP ${response.status}`;
  return new ApiError(response.status, explain(response.status, message, response.headers.get("Retry-After")), detail);
}

// fetch() that answers an ok Response or throws ApiError (an abort is rethrown as it is).
export async function call(method, path, { json, form, signal, headers } = {}) {
  const init = { method, signal, headers: headersWith(headers) };
  if (json !== undefined) {
    init.headers.set("Content-Type", "application/json");
    init.body = JSON.stringify(json);
  } else if (form !== undefined) {
    init.body = form; // the browser sets the multipart boundary
  }
  let response;
  try {
    response = await fetch(path, init);
  } catch (err) {
    if (err.name === "AbortError") throw err;
    throw new ApiError(0, explain(0, err.message));
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

export async function getJSON(path, options) {
  return (await call("GET", path, options)).json();
}

export async function sendJSON(method, path, json, options = {}) {
  const response = await call(method, path, { ...options, json });
  return response.status === 204 ? null : response.json();
}

// One SSE frame ("event:", "id:", "data:" lines) -> {event, id, data}; null for a comment (": ping").
function parseFrame(frame) {
  let event = "message";
  let id = null;
  const data = [];
  for (const raw of frame.split("\n")) {
    const line = raw.endsWith("\r") ? raw.slice(0, -1) : raw;
    if (!line || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") event = value;
    else if (field === "id") id = value;
    else if (field === "data") data.push(value);
  }
  if (!data.length) return null;
  return { event, id, data: JSON.parse(data.join("\n")) };
}

// Yields the events of an SSE response in batches: every complete frame of one network read,
// so that a caller redraws once per read rather than once per token.
export async function* eventBatches(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      const frames = buffer.split("\n\n");
      buffer = frames.pop(); // the unfinished frame, if any
      const batch = frames.map(parseFrame).filter(Boolean);
      if (batch.length) yield batch;
    }
  } finally {
    reader.cancel().catch(() => {}); // a caller that stops early closes the connection
  }
}
