// The chat page: one conversation on screen, its replies streamed from the server, all of them kept
// in this browser (store.js). Model output reaches the page as text only (markdown.js).

import { ApiError, apiKey, listModels, streamChat } from "./api.js";
import { renderMarkdown } from "./markdown.js";
import { attachmentOf, contentPart, openCamera, previewUrl, startRecording } from "./media.js";
import { deleteConversation, exportText, getConversation, listConversations, newConversation, parseExport, saveConversation } from "./store.js";

const $ = (id) => document.getElementById(id);
const SETTINGS_STORAGE = "mlx-gemma3n.settings";
const SETTINGS = { system: "system", temperature: "temperature", top_p: "top-p", max_tokens: "max-tokens", tools: "tools", tool_choice: "tool-choice" };
const TITLE_LENGTH = 48;

const state = {
  conversation: null,
  pending: [], // attachments of the message being written
  controller: null, // the reply in flight
  recording: null,
  camera: null,
};

function element(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function button(label, onClick, accessibleName) {
  const node = element("button", "", label);
  node.type = "button";
  if (accessibleName) node.setAttribute("aria-label", accessibleName);
  node.addEventListener("click", onClick);
  return node;
}

function say(message) {
  $("alert").textContent = message;
}

// --- settings, kept in localStorage ---

function loadSettings() {
  const saved = JSON.parse(localStorage.getItem(SETTINGS_STORAGE) || "{}");
  for (const [key, id] of Object.entries(SETTINGS)) {
    if (saved[key] !== undefined) $(id).value = saved[key];
    $(id).addEventListener("input", saveSettings);
  }
}

function saveSettings() {
  const values = Object.fromEntries(Object.entries(SETTINGS).map(([key, id]) => [key, $(id).value]));
  localStorage.setItem(SETTINGS_STORAGE, JSON.stringify(values));
}

function number(id, name) {
  const value = Number($(id).value);
  if ($(id).value === "" || !Number.isFinite(value)) throw new ApiError(`Settings: ${name} must be a number.`);
  return value;
}

function requestSettings() {
  const body = { temperature: number("temperature", "temperature"), top_p: number("top-p", "top-p"), max_tokens: number("max-tokens", "max tokens") };
  const tools = $("tools").value.trim();
  if (tools) {
    try {
      body.tools = JSON.parse(tools);
    } catch {
      throw new ApiError("Settings: tools must be JSON (a list of OpenAI tool declarations).");
    }
    body.tool_choice = $("tool-choice").value;
  }
  return body;
}

// --- the conversation as the API takes it ---

function apiMessages(messages) {
  const system = $("system").value.trim();
  const out = system ? [{ role: "system", content: system }] : [];
  for (const message of messages) {
    if (message.role === "user" && message.attachments?.length) {
      const parts = message.attachments.map(contentPart);
      if (message.content) parts.push({ type: "text", text: message.content });
      out.push({ role: "user", content: parts });
    } else if (message.role === "assistant" && message.tool_calls?.length) {
      out.push({ role: "assistant", content: message.content || null, tool_calls: message.tool_calls });
    } else if (message.role === "tool") {
      out.push({ role: "tool", tool_call_id: message.tool_call_id, content: message.content });
    } else {
      out.push({ role: message.role, content: message.content });
    }
  }
  return out;
}

// --- rendering ---

function renderAttachments(parent, attachments) {
  for (const attachment of attachments || []) {
    if (attachment.kind === "image") {
      const image = element("img", "thumbnail");
      image.src = previewUrl(attachment);
      image.alt = attachment.name;
      parent.append(image);
    } else {
      const player = element(attachment.kind === "video" ? "video" : "audio", attachment.kind === "video" ? "thumbnail" : "");
      player.controls = true;
      player.src = previewUrl(attachment);
      player.setAttribute("aria-label", attachment.name);
      parent.append(player);
    }
  }
}

function renderToolCalls(parent, message, index) {
  const answered = new Set(state.conversation.messages.slice(index + 1).filter((m) => m.role === "tool").map((m) => m.tool_call_id));
  for (const call of message.tool_calls || []) {
    const box = parent.appendChild(element("div", "tool-call"));
    box.append(element("code", "", `${call.function.name}(${call.function.arguments})`));
    if (answered.has(call.id) || state.controller) continue;
    const result = element("input");
    result.setAttribute("aria-label", `Result of ${call.function.name}`);
    box.append(result, button("Send result", () => sendToolResult(call, result.value)));
  }
}

function parses(json) {
  try {
    JSON.parse(json);
    return true;
  } catch {
    return false;
  }
}

function renderReply(article, message) {
  const body = article.querySelector(".body");
  body.replaceChildren(renderMarkdown(message.content));
  article.querySelector(".source").textContent = message.content;
  const stats = article.querySelector(".stats");
  stats.textContent = message.stats ? statsLine(message.stats) : "";
}

function statsLine(stats) {
  const parts = stats.tokens === null ? [] : [`${stats.tokens} tokens`];
  if (stats.tokensPerSecond !== null) parts.push(`${stats.tokensPerSecond.toFixed(1)} tok/s`);
  if (stats.firstTokenSeconds !== null) parts.push(`first token ${stats.firstTokenSeconds.toFixed(2)} s`);
  if (stats.stopped) parts.push("stopped");
  if (stats.cut) parts.push("cut at max tokens");
  return parts.join(" · ");
}

function renderMessage(message, index) {
  const article = element("article", `message ${message.role}`);
  article.setAttribute("aria-label", message.role === "assistant" ? "Reply" : message.role === "user" ? "You" : "Tool result");
  if (message.role === "assistant") {
    article.setAttribute("role", "article");
    article.append(element("div", "body"));
    const source = element("pre", "source");
    source.hidden = true;
    const toggle = button("Source", () => { source.hidden = !source.hidden; }, "Show the reply's source");
    article.append(source, element("p", "stats"), toggle);
    renderReply(article, message);
    renderToolCalls(article, message, index);
  } else {
    article.setAttribute("role", "group");
    renderAttachments(article, message.attachments);
    const label = message.role === "tool" ? `Result of ${message.name}: ` : "";
    article.append(element("p", "text", label + message.content));
  }
  return article;
}

function renderConversation() {
  const list = $("messages");
  list.replaceChildren(...state.conversation.messages.map(renderMessage));
  list.scrollTop = list.scrollHeight;
  $("title").textContent = state.conversation.title;
  updateButtons();
}

function updateButtons() {
  const busy = state.controller !== null;
  const messages = state.conversation?.messages || [];
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("regenerate").disabled = busy || !messages.some((m) => m.role === "user");
  $("edit").disabled = busy || !messages.some((m) => m.role === "user");
}

async function renderConversationList() {
  const list = $("conversations");
  const conversations = await listConversations();
  list.replaceChildren(...conversations.map((conversation) => {
    const item = element("li", conversation.id === state.conversation?.id ? "current" : "");
    const open = button(conversation.title, () => openConversation(conversation.id));
    open.className = "open";
    item.append(open,
      button("Rename", () => startRename(item, conversation), `Rename ${conversation.title}`),
      button("Delete", () => removeConversation(conversation), `Delete ${conversation.title}`));
    return item;
  }));
}

function startRename(item, conversation) {
  const input = element("input");
  input.value = conversation.title;
  input.setAttribute("aria-label", "Title");
  input.addEventListener("keydown", async (event) => {
    if (event.key === "Enter") {
      conversation.title = input.value.trim() || conversation.title;
      await saveConversation(conversation);
      if (conversation.id === state.conversation.id) state.conversation.title = conversation.title;
      $("title").textContent = state.conversation.title;
      await renderConversationList();
    } else if (event.key === "Escape") {
      await renderConversationList();
    }
  });
  item.replaceChildren(input);
  input.focus();
}

async function removeConversation(conversation) {
  if (!confirm(`Delete "${conversation.title}"?`)) return;
  await deleteConversation(conversation.id);
  if (conversation.id === state.conversation.id) {
    const rest = await listConversations();
    state.conversation = rest[0] || newConversation();
    renderConversation();
  }
  await renderConversationList();
}

async function openConversation(id) {
  if (state.controller) return;
  state.conversation = await getConversation(id);
  renderConversation();
  await renderConversationList();
}

// --- pending attachments ---

function renderPending() {
  $("pending").replaceChildren(...state.pending.map((attachment, i) => {
    const chip = element("span", "chip", attachment.name);
    chip.append(button("×", () => { state.pending.splice(i, 1); renderPending(); }, `Remove ${attachment.name}`));
    return chip;
  }));
}

async function attachFiles(files) {
  for (const file of files) {
    try {
      state.pending.push(await attachmentOf(file));
    } catch (error) {
      say(error.message);
    }
  }
  renderPending();
}

// --- sending and streaming ---

async function askForKey() {
  const dialog = $("key-dialog");
  $("key-input").value = "";
  dialog.showModal();
  await new Promise((resolve) => dialog.addEventListener("close", resolve, { once: true }));
  const key = $("key-input").value.trim();
  if (key) apiKey.set(key);
  return Boolean(key);
}

// Runs `action`; when the server wants an API key, asks for it once and runs `action` again.
async function withKey(action) {
  try {
    return await action();
  } catch (error) {
    if (error.status === 401 && await askForKey()) return action();
    throw error;
  }
}

async function reply() {
  const conversation = state.conversation;
  let body;
  try {
    body = { model: $("model").value, messages: apiMessages(conversation.messages), ...requestSettings() };
  } catch (error) {
    say(error.message);
    return;
  }
  const message = { role: "assistant", content: "" };
  conversation.messages.push(message);
  const index = conversation.messages.length - 1;
  state.controller = new AbortController();
  renderConversation();
  const article = $("messages").lastElementChild;
  say("");
  const started = performance.now();
  let firstToken = null;
  let pendingFrame = false;
  const calls = [];
  const onDelta = (delta) => {
    if (delta.content) {
      firstToken ??= performance.now();
      message.content += delta.content;
    }
    for (const fragment of delta.tool_calls || []) {
      firstToken ??= performance.now();
      const call = (calls[fragment.index] ??= { id: fragment.id, type: "function", function: { name: "", arguments: "" } });
      if (fragment.function?.name) call.function.name = fragment.function.name;
      if (fragment.function?.arguments) call.function.arguments += fragment.function.arguments;
    }
    if (!pendingFrame) {
      pendingFrame = true;
      requestAnimationFrame(() => { pendingFrame = false; renderReply(article, message); });
    }
  };
  let stopped = false;
  let usage = null;
  let finishReason = null;
  try {
    ({ usage, finishReason } = await withKey(() => streamChat(body, onDelta, state.controller.signal)));
  } catch (error) {
    if (error.name === "AbortError") {
      stopped = true;
    } else {
      say(error.message);
    }
  }
  const finished = performance.now();
  state.controller = null;
  const complete = calls.filter((call) => call && parses(call.function.arguments)); // a call cut by max tokens is dropped
  if (complete.length) message.tool_calls = complete;
  if (!message.content && !message.tool_calls && !stopped) {
    conversation.messages.splice(index, 1); // nothing came: the error says why
  } else {
    const tokens = usage?.completion_tokens ?? null;
    const decoding = firstToken === null ? null : (finished - firstToken) / 1000;
    message.stats = {
      tokens,
      tokensPerSecond: tokens && decoding > 0 && tokens > 1 ? (tokens - 1) / decoding : null,
      firstTokenSeconds: firstToken === null ? null : (firstToken - started) / 1000,
      stopped,
      cut: finishReason === "length",
    };
  }
  await saveConversation(conversation);
  if (conversation === state.conversation) renderConversation();
  await renderConversationList();
}

async function send() {
  if (state.controller) return;
  const text = $("message").value.trim();
  if (!text && !state.pending.length) return;
  const conversation = state.conversation;
  conversation.messages.push({ role: "user", content: text, attachments: state.pending });
  if (conversation.title === "New conversation") conversation.title = (text || state.pending[0].name).slice(0, TITLE_LENGTH);
  state.pending = [];
  $("message").value = "";
  renderPending();
  await reply();
}

async function sendToolResult(call, result) {
  state.conversation.messages.push({ role: "tool", tool_call_id: call.id, name: call.function.name, content: result });
  await reply();
}

function lastUserIndex() {
  return state.conversation.messages.map((m) => m.role).lastIndexOf("user");
}

async function regenerate() {
  const last = lastUserIndex();
  if (state.controller || last < 0) return;
  state.conversation.messages.splice(last + 1);
  await reply();
}

async function editLast() {
  const last = lastUserIndex();
  if (state.controller || last < 0) return;
  const [message] = state.conversation.messages.splice(last);
  $("message").value = message.content;
  state.pending = message.attachments || [];
  renderPending();
  renderConversation();
  $("message").focus();
  await saveConversation(state.conversation);
}

function stop() {
  state.controller?.abort();
}

// --- microphone and camera ---

async function toggleRecording() {
  const control = $("record");
  try {
    if (state.recording) {
      const recording = state.recording;
      state.recording = null;
      control.textContent = "Record";
      state.pending.push(await recording.stop());
      renderPending();
    } else {
      state.recording = await startRecording();
      control.textContent = "Stop recording";
    }
  } catch (error) {
    say(`The microphone: ${error.message}`);
  }
}

async function showCamera() {
  if (state.camera) return;
  try {
    $("take-photo").disabled = true; // until the camera shows a picture
    $("camera").hidden = false;
    state.camera = await openCamera($("camera-view"));
    $("take-photo").disabled = false;
  } catch (error) {
    $("camera").hidden = true;
    say(`The camera: ${error.message}`);
  }
}

function closeCamera(photo) {
  if (!state.camera) return;
  if (photo) state.pending.push(state.camera.capture());
  else state.camera.close();
  state.camera = null;
  $("camera").hidden = true;
  renderPending();
}

// --- export and import ---

async function exportConversations() {
  const blob = new Blob([exportText(await listConversations())], { type: "application/json" });
  const link = element("a");
  link.href = URL.createObjectURL(blob);
  link.download = `gemma3n-conversations-${new Date().toISOString().slice(0, 10)}.json`;
  link.click();
  URL.revokeObjectURL(link.href);
}

async function importConversations(file) {
  try {
    const conversations = parseExport(await file.text());
    for (const conversation of conversations) await saveConversation(conversation);
    say(`Imported ${conversations.length} conversation${conversations.length === 1 ? "" : "s"}.`);
    await renderConversationList();
  } catch (error) {
    say(`Import: ${error.message}`);
  }
}

// --- start ---

async function loadModels() {
  try {
    const models = await withKey(listModels);
    $("model").replaceChildren(...models.map((id) => Object.assign(element("option", "", id), { value: id })));
  } catch (error) {
    say(error.message);
  }
}

function wire() {
  $("composer").addEventListener("submit", (event) => { event.preventDefault(); send(); });
  $("message").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      send();
    }
  });
  document.addEventListener("keydown", (event) => { if (event.key === "Escape") stop(); });
  $("stop").addEventListener("click", stop);
  $("regenerate").addEventListener("click", regenerate);
  $("edit").addEventListener("click", editLast);
  $("new-chat").addEventListener("click", async () => {
    if (state.controller) return;
    state.conversation = newConversation();
    renderConversation();
    await renderConversationList();
  });
  $("attach").addEventListener("change", async (event) => { await attachFiles([...event.target.files]); event.target.value = ""; });
  $("import").addEventListener("change", async (event) => { await importConversations(event.target.files[0]); event.target.value = ""; });
  $("export").addEventListener("click", exportConversations);
  $("record").addEventListener("click", toggleRecording);
  $("camera-button").addEventListener("click", showCamera);
  $("take-photo").addEventListener("click", () => closeCamera(true));
  $("close-camera").addEventListener("click", () => closeCamera(false));
  $("forget-key").addEventListener("click", () => { apiKey.set(""); say("The API key is forgotten."); });
  document.addEventListener("paste", (event) => { if (event.clipboardData?.files.length) attachFiles([...event.clipboardData.files]); });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => { event.preventDefault(); attachFiles([...event.dataTransfer.files]); });
}

async function start() {
  wire();
  loadSettings();
  const [latest] = await listConversations();
  state.conversation = latest || newConversation();
  renderConversation();
  await renderConversationList();
  await loadModels();
  document.body.dataset.ready = "true";
}

start();
