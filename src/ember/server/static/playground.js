// Chat playground: a conversation streamed from this server's /v1/chat/completions (server-sent events).
// Stop aborts the fetch; the server sees the client disconnect and aborts the request in the engine.
"use strict";

const KEY_STORAGE = "ember-api-key";
const $ = (id) => document.getElementById(id);
const state = { model: null, history: [], controller: null };

function authHeaders() {
  const key = localStorage.getItem(KEY_STORAGE);
  return key ? { Authorization: "Bearer " + key } : {};
}

// The served model's id from /v1/models; a 401 means --api-key is set, so the page asks for the key.
async function loadModel() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: authHeaders() });
  } catch (err) {
    $("model-status").textContent = "server unreachable";
    setTimeout(loadModel, 2000);
    return;
  }
  if (response.status === 401) {
    $("key-box").classList.remove("hidden");
    $("model-status").textContent = "API key needed";
    return;
  }
  if (!response.ok) {  // 503 while the engine loads
    $("model-status").textContent = "engine not ready (" + response.status + ")";
    setTimeout(loadModel, 2000);
    return;
  }
  const body = await response.json();
  state.model = body.data[0].id;
  $("key-box").classList.add("hidden");
  $("model-status").textContent = "model: " + state.model;
}

function addMessage(role, text) {
  const box = document.createElement("div");
  box.className = "message " + role;
  box.innerHTML = '<div class="role"></div><div class="content"></div><div class="stats"></div>';
  box.querySelector(".role").textContent = role;
  box.querySelector(".content").textContent = text;
  $("messages").appendChild(box);
  box.scrollIntoView({ block: "end" });
  return box;
}

function numberField(id, parse) {
  const raw = $(id).value.trim();
  return raw === "" ? undefined : parse(raw);
}

function requestBody() {
  const messages = [];
  const system = $("system-prompt").value.trim();
  if (system) messages.push({ role: "system", content: system });
  return {
    model: state.model, messages: messages.concat(state.history), stream: true,
    stream_options: { include_usage: true, continuous_usage_stats: true },
    temperature: numberField("temperature", parseFloat), top_p: numberField("top-p", parseFloat),
    max_tokens: numberField("max-tokens", (v) => parseInt(v, 10)), seed: numberField("seed", (v) => parseInt(v, 10)),
  };
}

// Per-reply numbers, measured here: TTFT from send to the first text, tokens/s over the decode after it.
function showStats(box, run, ending) {
  const parts = [];
  if (run.firstAt !== null) parts.push("TTFT " + Math.round(run.firstAt - run.sentAt) + " ms");
  const span = (run.lastAt - run.firstAt) / 1000;
  if (run.numTokens > 1 && span > 0) parts.push(((run.numTokens - 1) / span).toFixed(1) + " tokens/s");
  parts.push(run.numTokens + " tokens");
  if (ending) parts.push(ending);
  box.querySelector(".stats").textContent = parts.join(" · ");
}

function handleEvent(data, box, run) {
  const chunk = JSON.parse(data);
  if (chunk.error) throw new Error(chunk.error.message);
  const now = performance.now();
  for (const choice of chunk.choices || []) {
    const text = choice.delta && choice.delta.content;
    if (text) {
      if (run.firstAt === null) run.firstAt = now;
      run.lastAt = now;
      run.text += text;
      run.numChunks += 1;
      box.querySelector(".content").textContent = run.text;
      box.dataset.numChunks = run.numChunks;  // how many pieces streamed in (read by the browser tests)
    }
    if (choice.finish_reason) run.finishReason = choice.finish_reason;
  }
  // usage comes with every chunk (continuous_usage_stats); count the text chunks if it does not
  run.numTokens = chunk.usage ? chunk.usage.completion_tokens : Math.max(run.numTokens, run.numChunks);
  showStats(box, run, null);
}

async function readStream(response, box, run) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        handleEvent(data, box, run);
      }
    }
  }
}

async function errorMessage(response) {
  try {
    return (await response.json()).error.message;
  } catch (err) {
    return "HTTP " + response.status;
  }
}

function setBusy(isBusy) {
  $("send").disabled = isBusy;
  $("stop").disabled = !isBusy;
}

async function send(text) {
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const box = addMessage("assistant", "");
  box.dataset.state = "streaming";
  const run = { sentAt: performance.now(), firstAt: null, lastAt: null, text: "", numChunks: 0, numTokens: 0,
                finishReason: null };
  state.controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", signal: state.controller.signal,
      headers: Object.assign({ "Content-Type": "application/json" }, authHeaders()),
      body: JSON.stringify(requestBody()),
    });
    if (response.status === 401) $("key-box").classList.remove("hidden");
    if (!response.ok) throw new Error(await errorMessage(response));
    await readStream(response, box, run);
    box.dataset.state = "done";
    showStats(box, run, run.finishReason ? "finish: " + run.finishReason : null);
  } catch (err) {
    const isStopped = err.name === "AbortError";
    box.dataset.state = isStopped ? "stopped" : "error";
    if (!isStopped) {
      box.classList.add("error");
      box.querySelector(".content").textContent = run.text + (run.text ? "\n" : "") + "Error: " + err.message;
    }
    showStats(box, run, isStopped ? "stopped" : null);
  } finally {
    // a stopped reply stays in the conversation as far as it went
    if (run.text) state.history.push({ role: "assistant", content: run.text });
    state.controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  if (!state.model) {
    addMessage("error", "No model yet: " + $("model-status").textContent);
    return;
  }
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controller && state.controller.abort());
$("clear").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").innerHTML = "";
});
$("save-key").addEventListener("click", () => {
  localStorage.setItem(KEY_STORAGE, $("api-key").value.trim());
  loadModel();
});
loadModel();
