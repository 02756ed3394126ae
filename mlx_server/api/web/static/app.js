// The chat page: a client of the server's public API like any other. It lists models
// (GET /v1/models) and streams answers (POST /v1/chat/completions with stream: true and
// stream_options.include_usage), sending the API key the user typed as a Bearer token.
// Model output is rendered through markdown.js, which builds DOM nodes and never parses HTML.

import { renderMarkdown } from "./markdown.js";
import { highlight } from "./highlight.js";

const KEY_STORAGE = "mlx-server.api-key"; // sessionStorage: this tab only
const SETTINGS_STORAGE = "mlx-server.settings"; // localStorage: model choice and settings
const NOT_READY_RETRY_MS = 2000;

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"),
  settingsToggle: $("settings-toggle"),
  settings: $("settings"),
  system: $("system"),
  temperature: $("temperature"),
  maxTokens: $("max-tokens"),
  tools: $("tools"),
  clear: $("clear"),
  banner: $("banner"),
  bannerText: $("banner-text"),
  bannerRetry: $("banner-retry"),
  chat: $("chat"),
  empty: $("empty"),
  composer: $("composer"),
  input: $("input"),
  send: $("send"),
  stop: $("stop"),
  keyDialog: $("key-dialog"),
  keyForm: $("key-form"),
  keyMessage: $("key-message"),
  keyInput: $("key-input"),
};

const state = {
  key: sessionStorage.getItem(KEY_STORAGE) || "",
  history: [], // the messages sent as context: {role, content, tool_calls?}
  controller: null, // the AbortController of the answer being streamed
  retryTimer: 0,
};

// -- small helpers ---------------------------------------------------------------------------

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.key) h.Authorization = `Bearer ${state.key}`;
  return h;
}

/** The API's own error message from a failed response (OpenAI's or Anthropic's shape). */
async function errorMessage(response) {
  const fallback = `${response.status} ${response.statusText}`.trim();
  try {
    const body = await response.json();
    return body?.error?.message || body?.message || fallback;
  } catch {
    return fallback;
  }
}

function showBanner(text, retry) {
  ui.bannerText.textContent = text;
  ui.banner.hidden = false;
  ui.bannerRetry.hidden = !retry;
  ui.bannerRetry.onclick = retry || null;
}

function hideBanner() {
  ui.banner.hidden = true;
}

function loadSettings() {
  try {
    return JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}") || {};
  } catch {
    return {};
  }
}

function saveSettings() {
  const settings = {
    model: ui.model.value || loadSettings().model || "",
    system: ui.system.value,
    temperature: ui.temperature.value,
    maxTokens: ui.maxTokens.value,
    tools: ui.tools.value,
  };
  localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(settings));
}

function nearBottom() {
  const c = ui.chat;
  return c.scrollHeight - c.scrollTop - c.clientHeight < 80;
}

function scrollDown(force) {
  if (force || nearBottom()) ui.chat.scrollTop = ui.chat.scrollHeight;
}

// -- the API key -----------------------------------------------------------------------------

function askKey(message) {
  ui.keyMessage.textContent = message;
  ui.keyInput.value = "";
  if (!ui.keyDialog.open) ui.keyDialog.showModal();
  ui.keyInput.focus();
}

ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  const key = ui.keyInput.value.trim();
  if (!key) return;
  state.key = key;
  sessionStorage.setItem(KEY_STORAGE, key);
  ui.keyDialog.close();
  loadModels();
});

ui.keyDialog.addEventListener("cancel", (event) => event.preventDefault()); // Esc: no key, no page

function keyRefused(message) {
  const had = Boolean(state.key);
  state.key = "";
  sessionStorage.removeItem(KEY_STORAGE);
  askKey(had ? `The server refused the key: ${message}` : "This server needs an API key.");
}

// -- models ----------------------------------------------------------------------------------

async function loadModels() {
  clearTimeout(state.retryTimer);
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (err) {
    showBanner(`Cannot reach the server: ${err.message}`, loadModels);
    return;
  }
  if (response.status === 401) {
    keyRefused(await errorMessage(response));
    return;
  }
  if (!response.ok) {
    const message = await errorMessage(response);
    if (response.status === 503) {
      showBanner(`The server is not ready: ${message} (trying again)`, loadModels);
      state.retryTimer = setTimeout(loadModels, NOT_READY_RETRY_MS);
    } else {
      showBanner(`Could not list the models: ${message}`, loadModels);
    }
    return;
  }
  const body = await response.json();
  const ids = (body.data || []).map((m) => m.id);
  const wanted = loadSettings().model;
  ui.model.replaceChildren(...ids.map((id) => new Option(id, id)));
  if (ids.includes(wanted)) ui.model.value = wanted;
  ui.model.disabled = ids.length === 0;
  hideBanner();
  if (ids.length === 0) showBanner("The server lists no models.", loadModels);
  document.body.dataset.ready = "true";
}

// -- rendering one exchange ------------------------------------------------------------------

function addUserMessage(text) {
  ui.empty.hidden = true;
  const article = el("article", "msg user");
  article.append(el("div", "bubble", text));
  ui.chat.append(article);
  scrollDown(true);
}

/** The view of one answer: reasoning (collapsible), text, tool calls, error and figures. */
class AnswerView {
  constructor() {
    this.article = el("article", "msg assistant streaming");
    this.reasoning = el("details", "reasoning");
    this.reasoning.hidden = true;
    this.reasoning.open = true;
    this.reasoningSummary = el("summary", "", "Thinking…");
    this.reasoningBody = el("div", "reasoning-body markdown");
    this.reasoning.append(this.reasoningSummary, this.reasoningBody);
    this.userToggled = false;
    this.reasoningSummary.addEventListener("click", () => {
      this.userToggled = true;
    });
    this.content = el("div", "content markdown");
    this.calls = el("div", "tool-calls");
    this.error = el("div", "error");
    this.error.hidden = true;
    this.error.setAttribute("role", "alert");
    this.stats = el("div", "stats");
    this.article.append(this.reasoning, this.content, this.calls, this.error, this.stats);
    ui.chat.append(this.article);
    this.pending = false;
    scrollDown(true);
  }

  /** Redraw from `answer` at the next frame (one redraw per frame however many deltas). */
  update(answer) {
    this.answer = answer;
    if (this.pending) return;
    this.pending = true;
    requestAnimationFrame(() => {
      this.pending = false;
      this.draw(this.answer);
    });
  }

  draw(answer) {
    const follow = nearBottom();
    if (answer.reasoning) {
      this.reasoning.hidden = false;
      renderMarkdown(this.reasoningBody, answer.reasoning);
      const answering = Boolean(answer.content || answer.toolCalls.length);
      if (answering || answer.done) this.reasoningSummary.textContent = "Reasoning";
      if (answering && !this.userToggled && !this.closedOnce) {
        this.reasoning.open = false; // collapse once the answer itself begins
        this.closedOnce = true;
      }
    }
    renderMarkdown(this.content, answer.content);
    this.drawCalls(answer.toolCalls);
    if (follow) scrollDown(true);
  }

  drawCalls(calls) {
    this.calls.replaceChildren(
      ...calls.filter(Boolean).map((call) => {
        const box = el("div", "tool-call");
        const head = el("div", "tool-call-head");
        head.append(el("span", "tool-call-label", "Tool call"), el("code", "tool-name", call.function.name));
        let args = call.function.arguments;
        try {
          args = JSON.stringify(JSON.parse(args), null, 2);
        } catch {
          // still streaming, or not JSON: shown as it came
        }
        const pre = el("pre");
        const code = el("code", "tool-args");
        code.append(highlight(args, "json"));
        pre.append(code);
        box.append(head, pre);
        return box;
      }),
    );
  }

  finish(answer) {
    answer.done = true;
    this.draw(answer);
    this.article.classList.remove("streaming");
    if (answer.error) {
      this.error.textContent = answer.error;
      this.error.hidden = false;
    }
    this.drawStats(answer);
    scrollDown(false);
  }

  drawStats(answer) {
    const parts = [];
    const d = this.stats.dataset;
    const exact = answer.usage && typeof answer.usage.completion_tokens === "number";
    const tokens = exact ? answer.usage.completion_tokens : answer.deltas;
    if (exact || answer.firstAt !== null) {
      d.tokens = String(tokens);
      d.exact = String(Boolean(exact));
      parts.push(`${exact ? "" : "~"}${tokens} tokens`);
    }
    if (answer.firstAt !== null) {
      // Decoding speed: the tokens after the first, over the time since the first arrived. An
      // answer that came in a few large pieces (a tool call the server parses whole) did most
      // of its decoding before anything arrived: its speed is taken over the whole request.
      const streamed = answer.deltas * 2 >= tokens;
      d.rate = streamed ? "decode" : "request";
      const since = streamed ? answer.firstAt : answer.startedAt;
      const seconds = (answer.endAt - since) / 1000;
      const counted = streamed ? tokens - 1 : tokens;
      if (counted > 0 && seconds > 0) {
        const tps = counted / seconds;
        d.tps = tps.toFixed(2);
        parts.push(`${tps.toFixed(1)} tok/s`);
      }
      const ttft = answer.firstAt - answer.startedAt;
      d.ttftMs = ttft.toFixed(1);
      parts.push(`TTFT ${(ttft / 1000).toFixed(2)} s`);
    }
    if (answer.usage && typeof answer.usage.prompt_tokens === "number") {
      parts.push(`prompt ${answer.usage.prompt_tokens} tokens`);
    }
    if (answer.stopped) parts.push("stopped");
    else if (answer.finish === "length") parts.push("cut at the token limit");
    d.finish = answer.stopped ? "stopped" : answer.error ? "error" : answer.finish || "";
    this.stats.textContent = parts.join(" · ");
  }
}

// -- streaming -------------------------------------------------------------------------------

function newAnswer() {
  return {
    content: "",
    reasoning: "",
    toolCalls: [],
    usage: null,
    finish: null,
    error: null,
    stopped: false,
    done: false,
    deltas: 0, // chunks that carried output: the token count when usage never came
    startedAt: performance.now(),
    firstAt: null,
    endAt: null,
  };
}

/** Apply one parsed SSE payload to `answer`; true when it carried output. */
function applyChunk(answer, chunk) {
  if (chunk.error) {
    answer.error = chunk.error.message || JSON.stringify(chunk.error);
    return false;
  }
  if (chunk.usage) answer.usage = chunk.usage;
  let output = false;
  for (const choice of chunk.choices || []) {
    const delta = choice.delta || {};
    if (delta.reasoning_content) {
      answer.reasoning += delta.reasoning_content;
      output = true;
    }
    if (delta.content) {
      answer.content += delta.content;
      output = true;
    }
    for (const part of delta.tool_calls || []) {
      const index = part.index ?? answer.toolCalls.length;
      const call = (answer.toolCalls[index] ||= {
        id: "",
        type: "function",
        function: { name: "", arguments: "" },
      });
      if (part.id) call.id = part.id;
      if (part.function?.name) call.function.name += part.function.name;
      if (part.function?.arguments) call.function.arguments += part.function.arguments;
      output = true;
    }
    if (choice.finish_reason) answer.finish = choice.finish_reason;
  }
  if (output) {
    answer.deltas++;
    if (answer.firstAt === null) answer.firstAt = performance.now();
  }
  return output;
}

/** Read a server-sent event stream into `answer`, redrawing `view` as it grows. */
async function readStream(response, answer, view) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n?/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event
        .split("\n")
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).replace(/^ /, ""))
        .join("\n");
      if (!data) continue; // a keep-alive comment
      if (data === "[DONE]") return;
      let chunk;
      try {
        chunk = JSON.parse(data);
      } catch {
        answer.error = `unreadable event from the server: ${data.slice(0, 200)}`;
        return;
      }
      applyChunk(answer, chunk);
      view.update(answer);
      if (answer.error) return;
    }
  }
  if (!answer.finish && !answer.error) answer.error = "the stream ended before the answer did";
}

function buildMessages() {
  const messages = [];
  const system = ui.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  return messages.concat(state.history);
}

function requestBody(tools) {
  const body = {
    model: ui.model.value,
    messages: buildMessages(),
    stream: true,
    stream_options: { include_usage: true },
  };
  if (ui.temperature.value !== "") body.temperature = Number(ui.temperature.value);
  if (ui.maxTokens.value !== "") body.max_tokens = Number(ui.maxTokens.value);
  if (tools) body.tools = tools;
  return body;
}

function parseTools() {
  const text = ui.tools.value.trim();
  if (!text) return { tools: null };
  try {
    const tools = JSON.parse(text);
    if (!Array.isArray(tools)) return { error: "Tools must be a JSON array." };
    return { tools };
  } catch (err) {
    return { error: `Tools are not valid JSON: ${err.message}` };
  }
}

function setBusy(busy) {
  ui.send.hidden = busy;
  ui.stop.hidden = !busy;
  document.body.dataset.busy = String(busy);
}

async function send() {
  const text = ui.input.value.trim();
  if (!text || state.controller) return;
  if (!ui.model.value) {
    showBanner("No model to ask: the model list has not loaded.", loadModels);
    return;
  }
  const { tools, error } = parseTools();
  if (error) {
    showBanner(error);
    return;
  }
  hideBanner();
  ui.input.value = "";
  autosize();
  saveSettings();
  addUserMessage(text);
  const turn = { role: "user", content: text };
  const history = state.history; // "New chat" replaces it: this answer then belongs nowhere
  history.push(turn);
  const view = new AnswerView();
  const answer = newAnswer();
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody(tools)),
      signal: controller.signal,
    });
    if (!response.ok) {
      answer.error = await errorMessage(response);
      if (response.status === 401) keyRefused(answer.error);
    } else {
      await readStream(response, answer, view);
    }
  } catch (err) {
    if (err.name === "AbortError") answer.stopped = true;
    else answer.error = `The connection failed: ${err.message}`;
  } finally {
    answer.endAt = performance.now();
    if (state.controller === controller) state.controller = null;
    setBusy(false);
    view.finish(answer);
  }
  if (answer.content || answer.toolCalls.length) {
    const message = { role: "assistant", content: answer.content };
    const calls = answer.toolCalls.filter(Boolean);
    if (calls.length) message.tool_calls = calls;
    history.push(message);
  } else {
    history.splice(history.indexOf(turn), 1); // a failed turn is shown, not sent again
  }
  if (history === state.history) ui.input.focus();
}

function stop() {
  if (state.controller) state.controller.abort(); // closing the stream ends it on the server
}

function clearConversation() {
  stop();
  state.history = [];
  ui.chat.replaceChildren(ui.empty);
  ui.empty.hidden = false;
  hideBanner();
  ui.input.focus();
}

// -- copying code ----------------------------------------------------------------------------

async function copyText(text) {
  if (navigator.clipboard && window.isSecureContext) {
    await navigator.clipboard.writeText(text);
    return;
  }
  const area = el("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "offscreen";
  document.body.append(area);
  area.select();
  const ok = document.execCommand("copy");
  area.remove();
  if (!ok) throw new Error("the browser refused to copy");
}

ui.chat.addEventListener("click", async (event) => {
  const button = event.target.closest("button.copy");
  if (!button) return;
  const code = button.closest(".code-block")?.querySelector("pre code");
  if (!code) return;
  try {
    await copyText(code.textContent);
    button.textContent = "Copied";
  } catch {
    button.textContent = "Copy failed";
  }
  setTimeout(() => {
    button.textContent = "Copy";
  }, 1500);
});

// -- wiring ----------------------------------------------------------------------------------

function autosize() {
  ui.input.style.height = "auto";
  ui.input.style.height = `${Math.min(ui.input.scrollHeight, 240)}px`;
}

ui.composer.addEventListener("submit", (event) => {
  event.preventDefault();
  send();
});
ui.input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
    event.preventDefault();
    send();
  }
});
ui.input.addEventListener("input", autosize);
document.addEventListener("keydown", (event) => {
  if (event.key === "Escape" && state.controller && !ui.keyDialog.open) {
    event.preventDefault();
    stop();
  }
});
ui.stop.addEventListener("click", stop);
ui.clear.addEventListener("click", clearConversation);
ui.model.addEventListener("change", saveSettings);
for (const field of [ui.system, ui.temperature, ui.maxTokens, ui.tools]) {
  field.addEventListener("change", saveSettings);
}
ui.settingsToggle.addEventListener("click", () => {
  ui.settings.hidden = !ui.settings.hidden;
  ui.settingsToggle.setAttribute("aria-expanded", String(!ui.settings.hidden));
});

const saved = loadSettings();
ui.system.value = saved.system || "";
ui.temperature.value = saved.temperature || "";
ui.maxTokens.value = saved.maxTokens || "";
ui.tools.value = saved.tools || "";
loadModels();
