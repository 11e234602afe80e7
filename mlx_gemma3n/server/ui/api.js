// The server's OpenAI API, as the page uses it: the models list and streamed chat completions.
// Failures come back as ApiError with a sentence a person can read.

const KEY_STORAGE = "mlx-gemma3n.api-key";

export class ApiError extends Error {
  constructor(message, status = 0) {
    super(message);
    this.status = status;
  }
}

export const apiKey = {
  get: () => localStorage.getItem(KEY_STORAGE) || "",
  set: (key) => localStorage.setItem(KEY_STORAGE, key),
};

function headers() {
  const key = apiKey.get();
  return { "Content-Type": "application/json", ...(key ? { Authorization: `Bearer ${key}` } : {}) };
}

async function call(path, options) {
  let response;
  try {
    response = await fetch(path, { ...options, headers: headers() });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new ApiError("The server cannot be reached: is it still running?");
  }
  if (!response.ok) {
    let message = `the server answered ${response.status} ${response.statusText}`;
    try {
      message = (await response.json()).error.message || message;
    } catch {
      // not an OpenAI error body: keep the status line
    }
    throw new ApiError(`The server refused the request: ${message}`, response.status);
  }
  return response;
}

export async function listModels() {
  const response = await call("/v1/models", { method: "GET" });
  return (await response.json()).data.map((entry) => entry.id);
}

// Streams a chat completion: onDelta({content, tool_calls}) for each chunk; resolves to the usage.
export async function streamChat(body, onDelta, signal) {
  const response = await call("/v1/chat/completions", {
    method: "POST",
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
    signal,
  });
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let usage = null;
  let finishReason = null;
  for (;;) {
    let chunk;
    try {
      chunk = await reader.read();
    } catch (error) {
      if (error.name === "AbortError") throw error;
      throw new ApiError("The connection to the server was lost in the middle of the reply.");
    }
    if (chunk.done) break;
    buffer += chunk.value;
    const events = buffer.split("\n\n");
    buffer = events.pop();
    for (const event of events) {
      const data = event.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("");
      if (!data || data === "[DONE]") continue;
      const parsed = JSON.parse(data);
      if (parsed.error) throw new ApiError(`The server stopped the reply: ${parsed.error.message}`);
      if (parsed.usage) usage = parsed.usage;
      for (const choice of parsed.choices || []) {
        if (choice.delta) onDelta(choice.delta);
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    }
  }
  return { usage, finishReason };
}
