/**
 * The playground page: chat (`/v1/chat/completions` with the whole conversation) and completion
 * (`/v1/completions`) modes, both streamed over SSE, a Stop button that aborts the request, the
 * served model's name (`/v1/models`) and tokens per second. A plain ES module with no
 * dependencies; it talks only to the server that served it, with `Authorization: Bearer KEY`
 * when the user has entered a key (kept in localStorage).
 */

const KEY_STORAGE = "lowbit.apiKey";

/** @param {string} id */
const $ = (id) => /** @type {HTMLElement} */ (document.getElementById(id));
const input = (/** @type {string} */ id) => /** @type {HTMLInputElement} */ ($(id));

const ui = {
  model: $("model"),
  key: input("api-key"),
  modes: [...document.querySelectorAll("[data-mode]")],
  error: $("error"),
  chat: $("chat"),
  system: input("system"),
  messages: $("messages"),
  completion: $("completion"),
  prompt: $("completion-prompt"),
  output: $("output"),
  composer: /** @type {HTMLFormElement} */ ($("composer")),
  input: input("input"),
  send: /** @type {HTMLButtonElement} */ ($("send")),
  stop: /** @type {HTMLButtonElement} */ ($("stop")),
  clear: /** @type {HTMLButtonElement} */ ($("clear")),
  state: $("state"),
  stats: $("stats"),
  temperature: input("temperature"),
  topP: input("top-p"),
  maxTokens: input("max-tokens"),
  stopStrings: input("stop-strings"),
  seed: input("seed"),
};

/**
 * @typedef {{ role: string, content: string, failed?: boolean }} Message
 * @typedef {"done" | "stopped" | "error"} Outcome
 */
const app = {
  /** @type {"chat" | "completion"} */
  mode: "chat",
  /** @type {string | null} */
  model: null,
  /** @type {Message[]} */
  history: [],
  /** @type {AbortController | null} */
  abort: null,
};

/** An error whose message is shown as is. */
class PageError extends Error {}

function storedKey() {
  try {
    return localStorage.getItem(KEY_STORAGE) ?? "";
  } catch {
    return "";
  }
}

function storeKey(/** @type {string} */ key) {
  try {
    if (key) localStorage.setItem(KEY_STORAGE, key);
    else localStorage.removeItem(KEY_STORAGE);
  } catch {
    // storage disabled: the key lasts for this page only
  }
}

/** Request headers: JSON, and the API key when one is entered. */
function headers() {
  /** @type {Record<string, string>} */
  const h = { "Content-Type": "application/json" };
  const key = ui.key.value.trim();
  if (key) h.Authorization = `Bearer ${key}`;
  return h;
}

/** The error text for a non-2xx response: the server's OpenAI-shaped `error.message`. */
async function responseError(/** @type {Response} */ res) {
  const text = await res.text().catch(() => "");
  let message = "";
  try {
    message = JSON.parse(text)?.error?.message ?? "";
  } catch {
    // not JSON: show the text itself
  }
  message ||= text.trim().slice(0, 500) || res.statusText || "no message";
  let shown = `Error ${res.status}: ${message}`;
  if (res.status === 401) {
    shown += "\nThis server needs an API key: enter it in the API key field at the top.";
  }
  return new PageError(shown);
}

/** fetch, with a clear message when the server cannot be reached. */
async function call(/** @type {string} */ url, /** @type {RequestInit} */ init) {
  let res;
  try {
    res = await fetch(url, { ...init, headers: headers() });
  } catch (e) {
    if (init.signal?.aborted) throw e;
    throw new PageError(`Could not reach the server: ${/** @type {Error} */ (e).message}`);
  }
  if (!res.ok) throw await responseError(res);
  return res;
}

function showError(/** @type {string} */ message) {
  ui.error.textContent = message;
  ui.error.hidden = false;
}

function hideError() {
  ui.error.hidden = true;
  ui.error.textContent = "";
}

function setState(/** @type {string} */ state, /** @type {string} */ text) {
  document.body.dataset.state = state;
  ui.state.textContent = text;
}

async function loadModelName() {
  try {
    const res = await call("/v1/models", {});
    const body = await res.json();
    app.model = body?.data?.[0]?.id ?? null;
    ui.model.textContent = app.model ?? "no model";
    hideError();
    return true;
  } catch (e) {
    app.model = null;
    ui.model.textContent = "model unknown";
    showError(/** @type {Error} */ (e).message);
    return false;
  }
}

/** The `data:` payloads of a server-sent event stream. */
async function* sseData(/** @type {Response} */ res) {
  if (!res.body) throw new PageError("The server sent no stream");
  const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  /** @type {string[]} */
  let data = [];
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += value;
      const lines = buffer.split(/\r?\n/);
      buffer = lines.pop() ?? "";
      for (const line of lines) {
        if (line === "") {
          if (data.length) yield data.join("\n");
          data = [];
        } else if (line.startsWith("data:")) {
          data.push(line.slice(line.startsWith("data: ") ? 6 : 5));
        }
      }
    }
    if (data.length) yield data.join("\n");
  } finally {
    reader.cancel().catch(() => {});
  }
}

/** A number field's value; undefined when empty. */
function numberField(/** @type {HTMLInputElement} */ field, /** @type {string} */ name) {
  if (field.validity.badInput) throw new PageError(`${name} must be a number`);
  return field.value.trim() === "" ? undefined : Number(field.value);
}

/**
 * Stop strings: comma or newline separated, each trimmed; `\n` and `\t` stand for a newline and
 * a tab.
 */
function stopStrings() {
  return ui.stopStrings.value.split(/[\n,]/).map((s) => s.trim())
    .map((s) => s.replace(/\\n/g, "\n").replace(/\\t/g, "\t")).filter((s) => s.length > 0);
}

/** The request's sampling fields; the server checks their ranges and names any it rejects. */
function sampling() {
  /** @type {Record<string, unknown>} */
  const p = {
    temperature: numberField(ui.temperature, "Temperature"),
    top_p: numberField(ui.topP, "Top-p"),
    max_tokens: numberField(ui.maxTokens, "Max tokens"),
    seed: numberField(ui.seed, "Seed"),
  };
  const stop = stopStrings();
  if (stop.length) p.stop = stop;
  if (app.model) p.model = app.model;
  for (const k of Object.keys(p)) if (p[k] === undefined) delete p[k];
  return p;
}

function formatStats(
  /** @type {number} */ tokens,
  /** @type {number} */ t0,
  /** @type {number | null} */ tFirst,
  /** @type {number | null} */ tLast,
) {
  const parts = [`${tokens} token${tokens === 1 ? "" : "s"}`];
  if (tFirst !== null) parts.push(`first token ${((tFirst - t0) / 1000).toFixed(2)} s`);
  if (tFirst !== null && tLast !== null && tokens > 1 && tLast > tFirst) {
    parts.push(`${((tokens - 1) / ((tLast - tFirst) / 1000)).toFixed(1)} tok/s`);
  }
  return parts.join(" · ");
}

function setBusy(/** @type {boolean} */ busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  ui.clear.disabled = busy;
  for (const b of ui.modes) /** @type {HTMLButtonElement} */ (b).disabled = busy;
}

/**
 * Streams one request to `url`, passing each text piece to `onText`; resolves with how it ended
 * (the Stop button aborts it: "stopped"). Errors are shown in the banner.
 * @param {string} url
 * @param {Record<string, unknown>} body
 * @param {(text: string) => void} onText
 * @returns {Promise<Outcome>}
 */
async function stream(url, body, onText) {
  const abort = new AbortController();
  app.abort = abort;
  hideError();
  setBusy(true);
  setState("running", "generating…");
  ui.stats.textContent = "";
  const t0 = performance.now();
  /** @type {number | null} */
  let tFirst = null;
  /** @type {number | null} */
  let tLast = null;
  let pieces = 0;
  /** @type {number | null} */
  let usageTokens = null;
  let finish = null;
  let ended = false;
  const tokens = () => usageTokens ?? pieces;
  try {
    const request = { ...body, stream: true, stream_options: { include_usage: true } };
    const res = await call(url, {
      method: "POST",
      body: JSON.stringify(request),
      signal: abort.signal,
    });
    for await (const data of sseData(res)) {
      if (data === "[DONE]") {
        ended = true;
        break;
      }
      const chunk = JSON.parse(data);
      if (chunk.error) throw new PageError(`The server ended the stream: ${chunk.error.message}`);
      if (chunk.usage) usageTokens = chunk.usage.completion_tokens;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const text = choice.text ?? choice.delta?.content ?? "";
      if (text) {
        tLast = performance.now();
        tFirst ??= tLast;
        pieces++;
        onText(text);
        ui.stats.textContent = formatStats(tokens(), t0, tFirst, tLast);
      }
      finish = choice.finish_reason ?? finish;
    }
    if (!ended) throw new PageError("The stream ended before its [DONE]: the server went away");
    ui.stats.textContent = formatStats(tokens(), t0, tFirst, tLast);
    const why = finish === "length" ? "max tokens reached" : finish === "stop" ? "stop" : finish;
    setState("done", why ? `done (${why})` : "done");
    return "done";
  } catch (e) {
    ui.stats.textContent = formatStats(tokens(), t0, tFirst, tLast);
    if (abort.signal.aborted) {
      setState("stopped", "stopped");
      return "stopped";
    }
    const message = e instanceof PageError
      ? e.message
      : `The request failed: ${/** @type {Error} */ (e).message}`;
    showError(message);
    setState("error", "error");
    return "error";
  } finally {
    app.abort = null;
    setBusy(false);
  }
}

/** Appends a message bubble; returns its content element. */
function addMessage(/** @type {Message} */ m, streaming = false) {
  const box = document.createElement("div");
  box.className = `msg ${m.role}${streaming ? " streaming" : ""}`;
  const role = document.createElement("span");
  role.className = "role";
  role.textContent = m.role;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = m.content;
  box.append(role, content);
  ui.messages.append(box);
  ui.chat.scrollTop = ui.chat.scrollHeight;
  return content;
}

async function sendChat(/** @type {string} */ text) {
  /** @type {Message} */
  const user = { role: "user", content: text };
  app.history.push(user);
  const userBox = /** @type {HTMLElement} */ (addMessage(user).parentElement);
  const reply = { role: "assistant", content: "" };
  const replyText = addMessage(reply, true);
  const replyBox = /** @type {HTMLElement} */ (replyText.parentElement);
  const system = ui.system.value.trim();
  const messages = [
    ...(system ? [{ role: "system", content: system }] : []),
    ...app.history.filter((m) => !m.failed).map(({ role, content }) => ({ role, content })),
  ];
  ui.input.value = "";
  const outcome = await stream("/v1/chat/completions", { ...sampling(), messages }, (piece) => {
    reply.content += piece;
    replyText.textContent = reply.content;
    ui.chat.scrollTop = ui.chat.scrollHeight;
  });
  replyBox.classList.remove("streaming");
  if (outcome === "error") {
    user.failed = true;
    userBox.classList.add("failed");
  }
  if (outcome === "error" || reply.content === "") replyBox.remove();
  else app.history.push(reply);
}

async function sendCompletion(/** @type {string} */ prompt) {
  ui.prompt.textContent = prompt;
  ui.output.textContent = "";
  await stream("/v1/completions", { ...sampling(), prompt }, (piece) => {
    ui.output.textContent += piece;
    ui.completion.scrollTop = ui.completion.scrollHeight;
  });
}

async function send() {
  if (app.abort) return;
  const text = ui.input.value;
  if (text.trim() === "") return;
  try {
    sampling(); // a bad field is reported before anything is sent
  } catch (e) {
    showError(/** @type {Error} */ (e).message);
    setState("error", "error");
    return;
  }
  if (app.mode === "chat") await sendChat(text);
  else await sendCompletion(text);
}

function setMode(/** @type {"chat" | "completion"} */ mode) {
  app.mode = mode;
  for (const b of ui.modes) {
    b.setAttribute("aria-pressed", String(/** @type {HTMLElement} */ (b).dataset.mode === mode));
  }
  ui.chat.hidden = mode !== "chat";
  ui.completion.hidden = mode !== "completion";
  ui.input.placeholder = mode === "chat" ? "Type a message" : "Type a prompt to continue";
  ui.input.focus();
}

function clear() {
  if (app.mode === "chat") {
    app.history = [];
    ui.messages.querySelectorAll(".msg").forEach((m) => m.remove());
  } else {
    ui.prompt.textContent = "";
    ui.output.textContent = "";
  }
  ui.stats.textContent = "";
  hideError();
  setState("idle", "ready");
}

ui.composer.addEventListener("submit", (e) => {
  e.preventDefault();
  send();
});
ui.input.addEventListener("keydown", (e) => {
  const enterSends = app.mode === "chat" && !e.shiftKey;
  if (e.key === "Enter" && (e.ctrlKey || e.metaKey || enterSends) && !e.isComposing) {
    e.preventDefault();
    send();
  }
});
ui.stop.addEventListener("click", () => app.abort?.abort());
ui.clear.addEventListener("click", clear);
for (const b of ui.modes) {
  b.addEventListener("click", () => {
    setMode(/** @type {"chat" | "completion"} */ (/** @type {HTMLElement} */ (b).dataset.mode));
  });
}
ui.key.addEventListener("change", async () => {
  storeKey(ui.key.value.trim());
  const ok = await loadModelName();
  setState(ok ? "idle" : "error", ok ? "ready" : "error");
});

ui.key.value = storedKey();
setMode("chat");
const ready = await loadModelName();
setState(ready ? "idle" : "error", ready ? "ready" : "error");
